"""The operator <-> runtime contract: what the builders write, the runtime accepts.

Every rendered container's args and env go through the runtime's own parser; every metric an
HPA or ScaledObject names comes from a series in the runtime's own registry.
"""

from __future__ import annotations

import argparse
import re

import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import REQUEST_METRICS, build_children
from kubemaas_operator.builders.autoscaling import ACTIVATION_TRIGGER_NAME
from kubemaas_operator.settings import OperatorSettings
from kubemaas_runtime.config import parse_serve_config
from kubemaas_runtime.fetch import add_fetch_arguments
from kubemaas_runtime.metrics import create_metrics
from prometheus_client import CollectorRegistry

from tests.unit.support import EXAMPLES, make_ms, model_services_in

SETTINGS = OperatorSettings()


def example_children() -> list[tuple[str, dict]]:
    out = []
    for path in EXAMPLES:
        for body in model_services_in(path):
            body["metadata"]["namespace"] = "ns"
            out += [(path.name, o) for o in build_children(ModelService.from_body(body), SETTINGS)]
    extra = make_ms({"model": {"uri": "pvc://c/p", "format": "safetensors", "architecture": "pkg.m:f"},
                     "runtime": {"maxDrift": 0.02, "batchTimeoutMs": 3, "auth": {"secretName": "token"}},
                     "autoscaling": {"engine": "keda", "minReplicas": 0, "maxReplicas": 2, "metric": "rps",
                                     "target": 3},
                     "gateway": {"name": "public"}})
    out += [("safetensors-pvc-keda", o) for o in build_children(extra, SETTINGS)]
    out += [(label, o) for label, ms in GENERATIVE_CASES.items() for o in build_children(ms, SETTINGS)]
    cached = make_ms({"model": {"uri": "hf://org/m@abc123", "format": "torchscript", "cache": "node"}})
    out += [("hf-node-cache", o) for o in build_children(cached, SETTINGS)]
    return out


# Generative ModelServices: every generation limit, every generative metric under both engines,
# and the KV budget the operator passes itself for the GPU-fit estimate.
_GGUF = {"uri": "pvc://models/smollm2", "format": "gguf"}
GENERATIVE_CASES = {
    "gguf-limits-hpa-running": make_ms({
        "model": _GGUF, "runtime": {"maxModelLen": 2048, "maxNumSeqs": 8, "kvCacheTokens": 8192},
        "autoscaling": {"maxReplicas": 4, "metric": "running-sequences", "target": 6}}),
    "hf-generation-hpa-waiting": make_ms({
        "model": {"uri": "hf://org/llm", "format": "transformers", "task": "text-generation",
                  "parameterCount": "13B"},
        "resources": {"gpu": {"count": 1}}, "variants": [{"name": "bf16", "quantization": "bf16"}],
        "autoscaling": {"maxReplicas": 4, "metric": "waiting-sequences", "target": 2}}),
    # the engine and the split: a 2-GPU vLLM variant beside a builtin one on a variant override
    "hf-vllm-tp2": make_ms({
        "model": {"uri": "pvc://llm-weights/llama", "format": "transformers", "task": "text-generation",
                  "parameterCount": "70B"},
        "resources": {"gpu": {"count": 2}}, "runtime": {"engine": "vllm"},
        "variants": [{"name": "bf16", "quantization": "bf16"}]}),
    "hf-builtin-tp1-of-1": make_ms({
        "model": {"uri": "pvc://llm-weights/llama", "format": "transformers", "task": "text-generation"},
        "resources": {"gpu": {"count": 1}}, "runtime": {"tensorParallelSize": 1},
        "variants": [{"name": "bf16", "quantization": "bf16", "engine": "builtin"}]}),
    "gguf-keda-kv-cache": make_ms({
        "model": _GGUF, "runtime": {"maxModelLen": 4096},
        "autoscaling": {"engine": "keda", "maxReplicas": 4, "metric": "kv-cache-usage", "target": 80}}),
    # compiled decode on the builtin engine: on the spec, and off again on one variant
    "gguf-compile-decode": make_ms({
        "model": _GGUF, "runtime": {"compile": "decode", "maxNumSeqs": 8},
        "variants": [{"name": "compiled", "weight": 50}, {"name": "eager", "compile": "off", "weight": 50}]}),
}


CHILDREN = example_children()
DEPLOYMENTS = [(label, o) for label, o in CHILDREN if o["kind"] == "Deployment"]


def test_the_runtime_reads_the_generation_limits_the_spec_sets():
    (dep,) = [o for label, o in CHILDREN if label == "gguf-limits-hpa-running" and o["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
    assert (config.format, config.task) == ("gguf", "text-generation")
    assert (config.max_model_len, config.max_num_seqs, config.kv_cache_tokens) == (2048, 8, 8192)


@pytest.mark.parametrize(("label", "engine", "split"), [
    ("hf-vllm-tp2", "vllm", 2), ("hf-builtin-tp1-of-1", "builtin", 1), ("gguf-keda-kv-cache", "auto", None)])
def test_the_runtime_reads_the_engine_and_the_split(label, engine, split):
    (dep,) = [o for lab, o in CHILDREN if lab == label and o["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
    assert (config.engine, config.tensor_parallel_size) == (engine, split)


def test_the_runtime_reads_the_compile_mode_the_operator_writes():
    """KUBEMAAS_COMPILE: decode where a variant compiles, left out (the runtime's off) elsewhere."""
    compiled = {}
    for label, dep in DEPLOYMENTS:
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
        compiled[(label, dep["metadata"]["name"])] = config.compile
    assert compiled.pop(("gguf-compile-decode", "m-compiled")) == "decode"
    assert set(compiled.values()) == {"off"}


def test_the_operators_compile_values_are_the_runtimes():
    """Every value spec.runtime.compile takes is one the runtime's --compile accepts; the one
    the operator leaves out is the runtime's default; the graphs the startup probe allows for
    are the buckets the runtime compiles."""
    from typing import get_args

    from kubemaas_operator import runtime_contract
    from kubemaas_operator.api.constants import CompileMode
    from kubemaas_operator.api.spec import RuntimeSpec
    from kubemaas_runtime.config import COMPILE_MODES, ServeConfig, env_var_for
    from kubemaas_runtime.generation.compiled_decode import batch_buckets

    assert set(get_args(CompileMode)) == set(COMPILE_MODES)
    assert runtime_contract.COMPILE_DECODE in COMPILE_MODES
    assert runtime_contract.COMPILE_DEFAULT == ServeConfig.compile == RuntimeSpec().compile
    assert runtime_contract.env_name(runtime_contract.COMPILE_FLAG) == env_var_for("--compile") == "KUBEMAAS_COMPILE"
    for mode in get_args(CompileMode):
        assert parse_serve_config([], {**GENERATION_ENV, "KUBEMAAS_COMPILE": mode}).compile == mode
    for seqs in [*range(1, 300), 1000, 1024, 1025, 4096]:
        assert runtime_contract.compile_graphs(seqs) == len(batch_buckets(seqs)), seqs


def test_the_runtime_reads_the_kv_budget_the_fit_estimate_assumed():
    from kubemaas_operator.gpufit import DEFAULT_KV_CACHE_TOKENS

    (dep,) = [o for label, o in CHILDREN if label == "hf-generation-hpa-waiting" and o["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
    assert config.kv_cache_tokens == DEFAULT_KV_CACHE_TOKENS and config.max_model_len is None


def test_the_operators_copy_of_the_runtime_contract_is_the_runtimes():
    """runtime_contract.py: the defaults the operator assumes and the paths it probes are the
    runtime's own, and its env rule is the runtime's for every serve flag."""
    from kubemaas_operator import runtime_contract
    from kubemaas_runtime import server
    from kubemaas_runtime.config import build_serve_parser, env_var_for

    config = parse_serve_config([], {"KUBEMAAS_MODEL_URI": "pvc://m/llm", "KUBEMAAS_FORMAT": "gguf"})
    assert config.max_num_seqs == runtime_contract.MAX_NUM_SEQS and config.kv_cache_tokens is None
    assert (runtime_contract.READY_PATH, runtime_contract.LIVE_PATH) == (server.READY_PATH, server.LIVE_PATH)
    flags = [s for action in build_serve_parser()._actions for s in action.option_strings if s.startswith("--")]
    assert "--max-num-seqs" in flags
    for flag in flags:
        assert runtime_contract.env_name(flag) == env_var_for(flag), flag


def test_the_probes_and_paths_the_operator_writes_are_the_contracts():
    from kubemaas_operator import runtime_contract

    for _, deployment in DEPLOYMENTS:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == runtime_contract.READY_PATH
        assert container["startupProbe"]["httpGet"]["path"] == runtime_contract.READY_PATH
        assert container["livenessProbe"]["httpGet"]["path"] == runtime_contract.LIVE_PATH
        config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
        assert (config.port, config.model_dir) == (runtime_contract.HTTP_PORT, runtime_contract.MODEL_DIR)
        if config.max_loras:
            assert config.adapter_dir == runtime_contract.ADAPTER_DIR


def test_every_generative_metric_is_named_by_an_autoscaler():
    named = set()
    for _, obj in CHILDREN:
        if obj["kind"] == "HorizontalPodAutoscaler":
            named |= {m["pods"]["metric"]["name"] for m in obj["spec"]["metrics"] if m["type"] == "Pods"}
        if obj["kind"] == "ScaledObject":
            named |= {n for t in obj["spec"]["triggers"] for n in re.findall(r"kubemaas_[a-z_]+", t["metadata"].get("query", ""))}
    assert {"kubemaas_num_requests_running", "kubemaas_num_requests_waiting", "kubemaas_kv_cache_usage_ratio"} <= named


def runtime_registry_names() -> set[str]:
    registry = CollectorRegistry()
    create_metrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # Unlabelled families have no samples until used; a counter's series is <name>_total.
    names.update(f"{family.name}_total" for family in registry.collect() if family.type == "counter")
    return names


@pytest.mark.parametrize("deployment", [o for _, o in DEPLOYMENTS],
                         ids=[f"{label}:{o['metadata']['name']}" for label, o in DEPLOYMENTS])
def test_runtime_parser_accepts_every_serving_container(deployment):
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kubemaas-runtime"] and container["args"][0] == "serve"
    env = {e["name"]: e["value"] for e in container["env"]}
    config = parse_serve_config(container["args"][1:], env)
    variant = deployment["metadata"]["labels"]["kubemaas.io/variant"]
    assert config.variant == variant
    assert config.name == deployment["metadata"]["labels"]["kubemaas.io/modelservice"]
    assert config.port == container["ports"][0]["containerPort"]
    assert config.model_dir == "/mnt/models"
    assert config.model_uri == env["KUBEMAAS_MODEL_URI"] and config.quantization == env["KUBEMAAS_QUANTIZATION"]
    assert config.device == env["KUBEMAAS_DEVICE"]
    for name in env:
        if name.startswith("KUBEMAAS_"):  # every variable is one the runtime reads
            assert name[len("KUBEMAAS_"):].lower() in vars(config), name


def test_fetch_init_container_command_is_the_runtimes():
    fetches = [c for _, o in DEPLOYMENTS for c in o["spec"]["template"]["spec"].get("initContainers", [])
               if c["name"] == "fetch-model"]
    assert fetches, "an example fetches from s3:// or hf://"
    parser = argparse.ArgumentParser()
    add_fetch_arguments(parser)  # the runtime's own `fetch` arguments
    for container in fetches:
        assert container["command"] == ["kubemaas-runtime"] and container["args"][0] == "fetch"
        args = parser.parse_args(container["args"][1:])
        assert args.uri.startswith(("s3://", "hf://"))
        assert args.max_bytes > 0 and args.timeout_seconds == SETTINGS.fetch_timeout_seconds
        assert args.cache == (args.dest != "/mnt/models")
        if args.cache:  # spec.model.cache node: the entry the runtime container mounts (its subPath)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            root = args.dest.rpartition("/")[0]
            assert root in mounts and mounts[root]["name"] == "model-cache"
    cached = [o for label, o in DEPLOYMENTS if label == "hf-node-cache"]
    assert cached, "the node-cache case renders a Deployment"
    for deployment in cached:
        spec = deployment["spec"]["template"]["spec"]
        (fetch,) = spec["initContainers"]
        args = parser.parse_args(fetch["args"][1:])
        assert args.cache
        (served,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/mnt/models"]
        assert served["readOnly"] and served["subPath"] == args.dest.rpartition("/")[2]


def test_auth_token_file_is_a_flag_naming_the_mounted_secret():
    authed = [o for label, o in DEPLOYMENTS if label == "safetensors-pvc-keda"]
    assert authed
    for deployment in authed:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
        mount = next(m for m in container["volumeMounts"] if m["name"] == "auth-token")
        assert config.auth_token_file == f"{mount['mountPath']}/token" and mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == "auth-token")
        assert volume["secret"] == {"secretName": "token", "items": [{"key": "token", "path": "token"}],
                                    "defaultMode": 0o440}
        assert not any("TOKEN" in e["name"] for e in container["env"])


def test_every_autoscaler_metric_is_a_runtime_series():
    names = runtime_registry_names()
    assert {metric.runtime_series for metric in REQUEST_METRICS.values()} <= names
    named = []
    for _, obj in CHILDREN:
        if obj["kind"] == "HorizontalPodAutoscaler":
            for metric in obj["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    hpa_name = metric["pods"]["metric"]["name"]
                    (source,) = [m.runtime_series for m in REQUEST_METRICS.values() if m.hpa_metric == hpa_name]
                    named.append(source)
        if obj["kind"] == "ScaledObject":
            for trigger in obj["spec"]["triggers"]:
                # The activation trigger reads demand from outside the pods (the Gateway), by design.
                if trigger["type"] == "prometheus" and trigger.get("name") != ACTIVATION_TRIGGER_NAME:
                    named += re.findall(r"kubemaas_[a-z_]+", trigger["metadata"]["query"])
    assert named, "the examples and cases include an HPA and a ScaledObject on request metrics"
    assert set(named) <= names, set(named) - names


# The generation seams agreed with the operator (issue 13): flags, env and metric names.
GENERATION_ENV = {"KUBEMAAS_MODEL_URI": "pvc://models/llm", "KUBEMAAS_FORMAT": "gguf",
                  "KUBEMAAS_TASK": "text-generation", "KUBEMAAS_MAX_MODEL_LEN": "4096",
                  "KUBEMAAS_MAX_NUM_SEQS": "32", "KUBEMAAS_KV_CACHE_TOKENS": "65536",
                  "KUBEMAAS_MAX_QUEUE": "64"}
GENERATION_METRICS = ("kubemaas_num_requests_running", "kubemaas_num_requests_waiting",
                      "kubemaas_kv_cache_usage_ratio", "kubemaas_time_to_first_token_seconds",
                      "kubemaas_inter_token_latency_seconds", "kubemaas_prompt_tokens_total",
                      "kubemaas_generation_tokens_total")


def test_runtime_reads_the_generation_limits_from_env():
    config = parse_serve_config([], GENERATION_ENV)
    assert (config.format, config.task) == ("gguf", "text-generation")
    assert (config.max_model_len, config.max_num_seqs, config.kv_cache_tokens,
            config.max_queue) == (4096, 32, 65536, 64)
    for name in GENERATION_ENV:
        assert name[len("KUBEMAAS_"):].lower() in vars(config), name


def test_runtime_reads_the_compile_mode_from_env():
    """--compile / KUBEMAAS_COMPILE (the builtin engine's compiled decode): off unless set."""
    assert parse_serve_config([], GENERATION_ENV).compile == "off"
    assert parse_serve_config([], {**GENERATION_ENV, "KUBEMAAS_COMPILE": "decode"}).compile == "decode"
    assert parse_serve_config(["--compile", "off"],
                              {**GENERATION_ENV, "KUBEMAAS_COMPILE": "decode"}).compile == "off"
    with pytest.raises(SystemExit):
        parse_serve_config([], {**GENERATION_ENV, "KUBEMAAS_COMPILE": "prefill"})


def test_generation_metrics_are_runtime_series_with_model_and_variant():
    registry = CollectorRegistry()
    create_metrics(registry).bind("llm", "bf16")
    families = {family.name: family for family in registry.collect()}
    names = runtime_registry_names()
    for name in GENERATION_METRICS:
        assert name in names, name
        family = families[name.removesuffix("_total")]
        assert {"model", "variant"} <= set(family.samples[0].labels), name


def test_adapter_sidecar_and_runtime_follow_one_list():
    """spec.adapters: the fetch-adapters sidecar's arguments are the runtime's own, and it
    fills the directory the serving container loads from; the runtime takes as many adapters
    as the API allows."""
    from kubemaas_operator.api.constants import MAX_ADAPTERS
    from kubemaas_runtime.__main__ import build_parser

    with_adapters = [o for label, o in DEPLOYMENTS if label == "chat-lora.yaml"]
    assert with_adapters
    for deployment in with_adapters:
        pod = deployment["spec"]["template"]["spec"]
        (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "fetch-adapters"]
        assert sidecar["restartPolicy"] == "Always" and sidecar["command"] == ["kubemaas-runtime"]
        args = build_parser().parse_args(sidecar["args"])
        (container,) = pod["containers"]
        config = parse_serve_config(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
        assert config.max_loras == MAX_ADAPTERS
        assert args.config == config.adapters_config and args.dest == config.adapter_dir
        serving = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert serving[config.adapter_dir]["readOnly"] is True
        assert config.adapters_config.startswith(next(
            path for path, m in serving.items() if m["name"] == "adapter-config") + "/")
        assert "envFrom" not in container  # the credentials stay in the sidecar


def test_lora_metrics_are_runtime_series_in_vllms_shape():
    from kubemaas_runtime.generation.adapters import AdapterRegistry

    registry = CollectorRegistry()
    adapters = AdapterRegistry(None, "llm", max_loras=8, metrics=create_metrics(registry))
    adapters.publish(["sql", "sql", "chat"], ["support"])
    families = {family.name: family for family in registry.collect()}
    names = runtime_registry_names()
    for name in ("vllm:lora_requests_info", "kubemaas_lora_requests_info"):
        assert name in names, name
        (sample,) = families[name].samples  # one series: the latest report
        assert sample.labels["running_lora_adapters"] == "chat,sql"
        assert sample.labels["waiting_lora_adapters"] == "support" and sample.labels["max_lora"] == "8"
    assert families["kubemaas_lora_requests_info"].samples[0].labels["model"] == "llm"


def test_the_runtime_reads_the_multi_node_flags_the_operator_sets():
    """resources.gpu.nodes > 1: the RayCluster head's env, through the runtime's own parser."""
    from kubemaas_operator.builders.raycluster import multi_node_env

    ms = make_ms({"model": {"uri": "pvc://w/llm", "format": "transformers", "task": "text-generation"},
                  "resources": {"gpu": {"count": 8, "nodes": 3}}})
    env = {e["name"]: e["value"] for e in multi_node_env(ms)}
    config = parse_serve_config([], {"KUBEMAAS_MODEL_URI": "pvc://w/llm", "KUBEMAAS_FORMAT": "transformers",
                                     "KUBEMAAS_TASK": "text-generation", **env})
    assert (config.pipeline_parallel_size, config.distributed_executor_backend) == (3, "ray")
    with pytest.raises(SystemExit):  # the builtin engine cannot take stages over nodes
        parse_serve_config([], {"KUBEMAAS_MODEL_URI": "pvc://w/llm", "KUBEMAAS_FORMAT": "transformers",
                                "KUBEMAAS_ENGINE": "builtin", **env})
