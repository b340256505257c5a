"""Generative ModelServices in the builders: the /v1 URL and route, the runtime's task and
limits, and the autoscaling metrics a text-generation runtime exports."""

from __future__ import annotations

import pytest
from kubemaas_operator.builders import build_children, build_hpa, build_http_route, service_url
from kubemaas_operator.builders.autoscaling import build_scaled_object
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import make_ms

SETTINGS = OperatorSettings()
GGUF = {"uri": "pvc://models/smollm2", "format": "gguf"}


def env_of(ms) -> dict[str, str]:
    (dep,) = [c for c in build_children(ms, SETTINGS) if c["kind"] == "Deployment"]
    return {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize(("model", "path"), [
    (GGUF, "/v1"),
    ({"uri": "hf://org/llm", "format": "transformers", "task": "text-generation"}, "/v1"),
    ({"uri": "hf://org/enc", "format": "transformers", "task": "feature-extraction"}, "/v2/models/m"),
])
def test_status_url(model, path):
    assert service_url(make_ms({"model": model}), SETTINGS) == f"http://m.ns.svc.cluster.local{path}"


@pytest.mark.parametrize(("model", "matches"), [
    (GGUF, [("PathPrefix", "/v2/models/m"), ("PathPrefix", "/v1")]),
    # an encoder's OpenAI routes (runtime/kubemaas_runtime/embeddings.py), exactly
    ({"uri": "hf://org/enc", "format": "transformers", "task": "feature-extraction"},
     [("PathPrefix", "/v2/models/m"), ("Exact", "/v1/embeddings"), ("Exact", "/v1/models")]),
    ({"uri": "hf://org/cls", "format": "transformers", "task": "text-classification"},
     [("PathPrefix", "/v2/models/m")]),
])
def test_http_route_matches_the_openai_routes_the_runtime_serves(model, matches):
    route = build_http_route(make_ms({"model": model, "gateway": {"name": "public"}}), [("m-default", 100)])
    assert [(m["path"]["type"], m["path"]["value"]) for m in route["spec"]["rules"][0]["matches"]] == matches


def test_gguf_runs_text_generation_with_the_limits_the_spec_sets():
    env = env_of(make_ms({"model": GGUF, "runtime": {"maxModelLen": 2048, "maxNumSeqs": 8, "kvCacheTokens": 4096}}))
    assert (env["KUBEMAAS_FORMAT"], env["KUBEMAAS_TASK"]) == ("gguf", "text-generation")
    assert (env["KUBEMAAS_MAX_MODEL_LEN"], env["KUBEMAAS_MAX_NUM_SEQS"], env["KUBEMAAS_KV_CACHE_TOKENS"]) == (
        "2048", "8", "4096")


def test_unset_limits_are_left_to_the_runtime():
    env = env_of(make_ms({"model": GGUF}))
    assert not {"KUBEMAAS_MAX_MODEL_LEN", "KUBEMAAS_MAX_NUM_SEQS", "KUBEMAAS_KV_CACHE_TOKENS"} & set(env)


@pytest.mark.parametrize(("metric", "target", "series", "hpa_value", "keda_threshold"), [
    ("running-sequences", 12, "kubemaas_num_requests_running", "12", "12"),
    ("waiting-sequences", 2, "kubemaas_num_requests_waiting", "2", "2"),
    ("kv-cache-usage", 80, "kubemaas_kv_cache_usage_ratio", "800m", "0.8"),  # a percent of a 0..1 ratio
    ("kv-cache-usage", 5, "kubemaas_kv_cache_usage_ratio", "50m", "0.05"),
])
def test_generative_autoscaling_metrics(metric, target, series, hpa_value, keda_threshold):
    ms = make_ms({"model": GGUF, "autoscaling": {"maxReplicas": 4, "metric": metric, "target": target}})
    (hpa_metric,) = build_hpa(ms, ms.spec.autoscaling)["spec"]["metrics"]
    assert hpa_metric["pods"] == {"metric": {"name": series},
                                  "target": {"type": "AverageValue", "averageValue": hpa_value}}
    keda = make_ms({"model": GGUF, "autoscaling": {"engine": "keda", "maxReplicas": 4, "metric": metric,
                                                    "target": target}})
    (trigger,) = build_scaled_object(keda, keda.spec.autoscaling, SETTINGS)["spec"]["triggers"]
    assert trigger["metadata"]["query"] == f'sum({series}{{namespace="ns",model="m"}})'
    assert trigger["metadata"]["threshold"] == keda_threshold
