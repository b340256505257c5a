"""The engine per variant: how `auto` resolves, the image flavour, the env the runtime gets, tensor
parallelism, /dev/shm, the startup probe, and EngineCannotShard before any pod."""

from __future__ import annotations

import io

import pytest
from kubemaas_operator import engine, gpufit
from kubemaas_operator.builders import PinnedImages, build_children
from kubemaas_operator.policy import policy_problem
from kubemaas_operator.reconcile import decide
from kubemaas_operator.render import run_render
from kubemaas_operator.settings import OperatorSettings
from pydantic import ValidationError

from tests.unit.support import ENCODER, GGUF, LLM, make_body, make_ms
from tests.unit.support import engine_spec as spec

SETTINGS = OperatorSettings(runtime_image="registry.example/kubemaas-runtime:2.0",
                            runtime_image_vllm="registry.example/kubemaas-runtime-vllm:2.0")
BUILTIN, VLLM = SETTINGS.runtime_image, SETTINGS.runtime_image_vllm


def deployments(ms, settings=SETTINGS):
    return {c["metadata"]["name"]: c for c in build_children(ms, settings) if c["kind"] == "Deployment"}


def container(dep):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(dep):
    return {e["name"]: e["value"] for e in container(dep)["env"]}


# --- auto, and the image flavour it picks -----------------------------------------------------

@pytest.mark.parametrize(("model", "gpus", "asked", "expected"), [
    (LLM, 1, "auto", "vllm"),        # a transformers chat model with a GPU
    (LLM, 0, "auto", "builtin"),     # on CPU
    (GGUF, 1, "auto", "builtin"),    # vLLM loads no GGUF
    (ENCODER, 1, "auto", "builtin"),  # an encoder: the builtin engine's tensor routes
    (LLM, 1, "builtin", "builtin"),  # asked for: as asked
    (LLM, 0, "vllm", "vllm"),        # vLLM on CPU (its CPU build) when asked for
])
def test_auto_resolves_by_format_task_and_gpu(model, gpus, asked, expected):
    ms = make_ms(spec(model, gpus, {"engine": asked}))
    (variant,) = ms.spec.variants
    assert engine.resolved_engine(ms, variant) == expected
    (dep,) = deployments(ms).values()
    assert container(dep)["image"] == (VLLM if expected == "vllm" else BUILTIN)


def test_a_variant_engine_overrides_the_spec_and_each_runs_its_flavour():
    ms = make_ms(spec(LLM, 1, {"engine": "builtin"}, [
        {"name": "a", "weight": 50}, {"name": "b", "weight": 50, "engine": "vllm"}]))
    deps = deployments(ms)
    assert (container(deps["m-a"])["image"], container(deps["m-b"])["image"]) == (BUILTIN, VLLM)
    assert (env_of(deps["m-a"])["KUBEMAAS_ENGINE"], env_of(deps["m-b"])["KUBEMAAS_ENGINE"]) == ("builtin", "vllm")


def test_auto_is_the_runtimes_default_and_not_written():
    (dep,) = deployments(make_ms(spec(LLM, 1))).values()
    assert "KUBEMAAS_ENGINE" not in env_of(dep)
    assert "KUBEMAAS_TENSOR_PARALLEL_SIZE" not in env_of(dep)  # one GPU: the runtime's default


def test_the_spec_image_serves_every_flavour():
    ms = make_ms(spec(LLM, 1, {"image": "registry.example/kubemaas-runtime:custom"}))
    (dep,) = deployments(ms).values()
    assert container(dep)["image"] == "registry.example/kubemaas-runtime:custom"


def test_each_flavour_is_pinned_by_its_own_status_field():
    body = make_body(spec(LLM, 1, variants=[{"name": "a", "weight": 50, "engine": "builtin"},
                                            {"name": "b", "weight": 50}]))
    body["status"] = {"runtimeImage": "registry.example/kubemaas-runtime:1.0",
                      "vllmRuntimeImage": "registry.example/kubemaas-runtime-vllm:1.0"}
    from kubemaas_operator.api import ModelService
    deps = deployments(ModelService.from_body(body))
    assert container(deps["m-a"])["image"] == "registry.example/kubemaas-runtime:1.0"
    assert container(deps["m-b"])["image"] == "registry.example/kubemaas-runtime-vllm:1.0"


def test_a_variant_without_an_engine_keeps_its_revision():
    """Fields at their defaults leave the revision alone: an upgrade starts no canary."""
    from kubemaas_operator.builders import variant_revisions
    plain = make_ms(spec(GGUF, 0))
    auto = make_ms(spec(GGUF, 0, {"engine": "auto"}))
    assert variant_revisions(plain, "img:1") == variant_revisions(auto, "img:1")
    asked = make_ms(spec(GGUF, 0, variants=[{"name": "default", "engine": "builtin"}]))
    assert variant_revisions(asked, "img:1") != variant_revisions(plain, "img:1")


def test_the_allowlist_applies_to_both_flavours():
    ms = make_ms(spec(LLM, 1))  # auto: the vLLM flavour
    assert policy_problem(ms, SETTINGS, None) is None  # the operator's own images are allowed
    pinned = PinnedImages(vllm="docker.io/someone/vllm:latest")
    refused = policy_problem(ms, SETTINGS, pinned)
    assert refused is not None and refused.reason == "ImageNotAllowed"
    assert "docker.io/someone/vllm:latest" in refused.message
    # the vllm repository's other tags are allowed by default, as the builtin one's are
    assert policy_problem(ms, SETTINGS, PinnedImages(vllm="registry.example/kubemaas-runtime-vllm:1.9")) is None


# --- the rule with two enforcers (the API server checks it too: tests/e2e/test_crd_validation.py) ---

@pytest.mark.parametrize("body", [
    spec(GGUF, 0, {"engine": "vllm"}),
    spec(GGUF, 0, variants=[{"name": "a", "weight": 50}, {"name": "b", "weight": 50, "engine": "vllm"}]),
    spec(ENCODER, 1, {"engine": "vllm"}),
    spec({"uri": "pvc://c/m.pt", "format": "torchscript"}, 1, {"engine": "vllm"}),
])
def test_vllm_serves_only_transformers_text_generation(body):
    with pytest.raises(ValidationError) as raised:
        make_ms(body)
    assert "vllm serves only model.format transformers with model.task text-generation" in str(raised.value)


@pytest.mark.parametrize(("gpus", "split", "ok"), [(4, 2, True), (4, 4, True), (4, 1, True), (4, 3, False),
                                                   (0, 1, False), (2, 4, False)])
def test_tensor_parallel_size_divides_the_gpus(gpus, split, ok):
    body = spec(LLM, gpus, {"tensorParallelSize": split})
    if ok:
        make_ms(body)
        return
    with pytest.raises(ValidationError, match="runtime.tensorParallelSize"):
        make_ms(body)


# --- tensor parallelism, /dev/shm, the startup probe ------------------------------------------------

def test_a_two_gpu_variant_is_split_over_both():
    (dep,) = deployments(make_ms(spec(LLM, 2))).values()
    env = env_of(dep)
    assert env["KUBEMAAS_TENSOR_PARALLEL_SIZE"] == "2" and container(dep)["image"] == VLLM
    assert container(dep)["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_tensor_parallel_size_from_the_spec_wins_and_sizes_the_estimate():
    ms = make_ms(spec({**LLM, "parameterCount": "8B"}, 4, {"tensorParallelSize": 2}))
    (dep,) = deployments(ms).values()
    assert env_of(dep)["KUBEMAAS_TENSOR_PARALLEL_SIZE"] == "2"
    (variant,) = ms.spec.variants
    assert gpufit.estimate(ms, variant).gpus == 2  # one copy of the model is on two GPUs


def volumes(dep):
    pod = dep["spec"]["template"]["spec"]
    return ({v["name"]: v for v in pod["volumes"]},
            {m["mountPath"]: m["name"] for m in container(dep)["volumeMounts"]})


@pytest.mark.parametrize(("model", "gpus", "runtime", "size"), [
    (LLM, 2, None, "3Gi"),              # vllm over 2 GPUs: 1 GiB + 1 GiB per GPU
    (LLM, 8, None, "9Gi"),
    (LLM, 1, None, "1Gi"),              # vllm on one GPU: its own processes' share
    (LLM, 4, {"tensorParallelSize": 2}, "3Gi"),
    (GGUF, 1, None, None),                 # builtin, one device: no shared memory wanted
    (ENCODER, 0, None, None),
])
def test_dev_shm_is_sized_for_the_split(model, gpus, runtime, size):
    (dep,) = deployments(make_ms(spec(model, gpus, runtime))).values()
    by_name, mounts = volumes(dep)
    if size is None:
        assert "dshm" not in by_name and "/dev/shm" not in mounts
        return
    assert by_name["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
    assert mounts["/dev/shm"] == "dshm"


@pytest.mark.parametrize("asked", ["builtin", "vllm"])
def test_the_startup_probe_and_progress_deadline_are_sized_by_engine(asked):
    (dep,) = deployments(make_ms(spec({**LLM, "parameterCount": "70B"}, 1, {"engine": asked}))).values()
    probe = container(dep)["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    load = 600 + -(-140_000_000_000 // (100 * 2**20))
    expected = load + (gpufit.VLLM_EXTRA_SECONDS if asked == "vllm" else 0)
    assert budget == expected - expected % probe["periodSeconds"]
    assert dep["spec"]["progressDeadlineSeconds"] == expected + 300  # the Deployment waits as long


# --- EngineCannotShard -------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "runtime", "fragment"), [
    (LLM, {"engine": "builtin"}, "engine builtin runs a model on one GPU"),
    (GGUF, None, "engine auto, which takes builtin here"),
])
def test_builtin_with_two_gpus_is_refused_before_any_pod(model, runtime, fragment):
    ms = make_ms(spec(model, 2, runtime, variants=[{"name": "a", "weight": 50},
                                                    {"name": "b", "weight": 50, "engine": "vllm"}]
                      if model is LLM else None))
    plan = decide(ms, SETTINGS, None)
    names = {c["metadata"]["name"] for c in plan.children if c["kind"] == "Deployment"}
    refused = "m-a" if model is LLM else "m-default"
    assert refused not in names and refused in plan.keep  # never created; an earlier one stays serving
    assert plan.refused is not None and plan.refused.reason == "EngineCannotShard"
    assert fragment in plan.refused.message and "use engine: vllm or one GPU" in plan.refused.message
    if model is LLM:
        assert names == {"m-b"}  # the vLLM variant is placed across both GPUs


def test_builtin_on_one_gpu_or_cpu_is_placed():
    for gpus in (0, 1):
        plan = decide(make_ms(spec(GGUF, gpus)), SETTINGS, None)
        assert plan.refused is None and {c["kind"] for c in plan.children} >= {"Deployment"}


def test_render_refuses_what_cannot_shard(tmp_path):
    path = tmp_path / "ms.yaml"
    path.write_text("apiVersion: kubemaas.io/v1alpha1\nkind: ModelService\nmetadata: {name: m}\n"
                    "spec: {model: {uri: 'pvc://models/smollm2', format: gguf}, resources: {gpu: {count: 2}}}\n")
    err = io.StringIO()
    assert run_render([str(path)], "default", SETTINGS, out=io.StringIO(), err=err) == 1
    assert "EngineCannotShard: Variant default: engine auto" in err.getvalue()


def test_render_refuses_a_replica_over_several_nodes(tmp_path):
    path = tmp_path / "ms.yaml"
    path.write_text("apiVersion: kubemaas.io/v1alpha1\nkind: ModelService\nmetadata: {name: m}\n"
                    "spec: {model: {uri: 'pvc://w/llama', format: transformers, task: text-generation},\n"
                    "       resources: {gpu: {count: 8, nodes: 2}}}\n")
    err = io.StringIO()
    assert run_render([str(path)], "default", SETTINGS, out=io.StringIO(), err=err) == 1
    assert "MultiNodeNotSupported: Variant default: resources.gpu.nodes 2" in err.getvalue()
