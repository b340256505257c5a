"""GPU fit: the per-GPU estimate, the placement it implies, and the refusal it words."""

from __future__ import annotations

import math

import pytest
from kubemaas_operator import gpufit, placement
from kubemaas_operator.builders import build_children
from kubemaas_operator.observe import Observation, compute_status
from kubemaas_operator.reconcile import decide, rollout_status
from kubemaas_operator.settings import OperatorSettings

from tests.unit.support import make_ms

SETTINGS = OperatorSettings()
GIB = 1024**3
H100 = "NVIDIA-H100-80GB-HBM3"
L4 = "NVIDIA-L4"
# What GPU feature discovery publishes for those GPUs (MiB), as the local cluster's nodes carry it.
NODES = (placement.GpuNode("gpu-h100-0", 81559, H100, gpus=8), placement.GpuNode("gpu-h100-1", 81559, H100, gpus=8),
         placement.GpuNode("gpu-l4-0", 23034, L4, gpus=1))
MEMORY = "nvidia.com/gpu.memory"


def llm(parameters="70B", quantizations=("bf16",), gpus=1, product=None, runtime=None, task="text-generation",
        affinity=None):
    gpu = {"count": gpus, **({"product": product} if product else {})}
    weight = 100 // len(quantizations)
    variants = [{"name": q.split("-")[0], "quantization": q, "weight": weight} for q in quantizations]
    variants[0]["weight"] += 100 - weight * len(variants)
    spec = {"model": {"uri": "hf://org/llm", "format": "transformers", "task": task,
                      **({"parameterCount": parameters} if parameters is not None else {})},
            "resources": {"gpu": gpu}, "variants": variants}
    if runtime:
        spec["runtime"] = runtime
    if affinity:
        spec["scheduling"] = {"affinity": affinity}
    return make_ms(spec)


def one_estimate(ms) -> gpufit.GpuEstimate:
    (variant,) = ms.spec.variants
    found = gpufit.estimate(ms, variant)
    assert found is not None
    return found


def deployment_of(children, name):
    (dep,) = [c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == name]
    return dep


# --- the estimate ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "count"), [
    ("135M", 135_000_000), ("7B", 7_000_000_000), ("70B", 70_000_000_000), ("1.5B", 1_500_000_000),
    ("2T", 2_000_000_000_000), ("12K", 12_000), ("8030261248", 8_030_261_248), (70_000_000_000, 70_000_000_000),
])
def test_parameter_count_forms(text, count):
    assert llm(parameters=text).spec.model.parameters == count


@pytest.mark.parametrize(("quantization", "bytes_per_parameter"), [
    ("none", 4), ("fp16", 2), ("bf16", 2), ("int8-weight-only", 1), ("int4-weight-only", 0.5),
])
@pytest.mark.parametrize("parameters", [135_000_000, 7_000_000_000, 13_000_000_000, 70_000_000_000])
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_estimate_table(quantization, bytes_per_parameter, parameters, gpus):
    est = one_estimate(llm(parameters=parameters, quantizations=(quantization,), gpus=gpus))
    assert est.weights == math.ceil(parameters * bytes_per_parameter)
    assert est.kv_tokens == gpufit.DEFAULT_KV_CACHE_TOKENS  # no limit set: the operator's budget
    assert est.kv_cache == est.kv_tokens * gpufit.kv_bytes_per_token(parameters)
    assert est.overhead == 2 * GIB
    # weights and KV cache are split over the GPUs (tensor parallel); each GPU has its own overhead
    assert est.per_gpu == math.ceil((est.weights + est.kv_cache) / gpus) + 2 * GIB
    assert est.per_gpu_mib == math.ceil(est.per_gpu / 2**20)


@pytest.mark.parametrize(("parameters", "real_bytes_per_token"), [
    (6_740_000_000, 2 * 32 * 4096 * 2),    # Llama-2-7B: 32 layers x 4096, no GQA
    (13_000_000_000, 2 * 40 * 5120 * 2),   # Llama-2-13B: 40 layers x 5120
])
def test_kv_bytes_per_token_match_dense_models(parameters, real_bytes_per_token):
    assert abs(gpufit.kv_bytes_per_token(parameters) / real_bytes_per_token - 1) < 0.06


def test_kv_bytes_per_token_bound_grouped_query_attention_from_above():
    llama3_70b = 2 * 80 * 8 * 128 * 2  # 80 layers, 8 KV heads of 128
    assert gpufit.kv_bytes_per_token(70_600_000_000) > llama3_70b


@pytest.mark.parametrize(("runtime", "tokens"), [
    ({"kvCacheTokens": 20000}, 20000),
    ({"maxModelLen": 2048}, 16 * 2048),                    # the runtime reserves maxNumSeqs x maxModelLen
    ({"maxModelLen": 2048, "maxNumSeqs": 4}, 4 * 2048),
    ({"maxModelLen": 2048, "kvCacheTokens": 3000}, 3000),  # the budget wins
    (None, gpufit.DEFAULT_KV_CACHE_TOKENS),
])
def test_kv_cache_comes_from_the_generation_limits(runtime, tokens):
    assert one_estimate(llm(runtime=runtime)).kv_tokens == tokens


def test_an_encoder_has_no_kv_cache():
    est = one_estimate(llm(parameters="335M", task="feature-extraction"))
    assert est.kv_cache == 0 and "KV cache" not in est.describe()


def test_no_estimate_without_parameter_count_or_gpus():
    assert placement.fit_variants(llm(parameters=None), NODES, MEMORY) == ()
    assert placement.fit_variants(llm(gpus=0, quantizations=("none",)), NODES, MEMORY) == ()


def test_description_gives_the_parts_in_gib():
    est = one_estimate(llm(quantizations=("fp16",), runtime={"kvCacheTokens": 3342}))
    # 70B x 2 bytes = 130.4 GiB; 3342 tokens x 2.57 MB = 8 GiB; 2 GiB overhead; ~141 in all
    assert est.describe() == ("needs ~141 GiB per GPU (70B parameters at fp16: 130 GiB, "
                              "KV cache 8 GiB for 3342 tokens (dense upper bound), overhead 2 GiB)")
    two = one_estimate(llm(quantizations=("bf16",), gpus=2))
    assert two.describe().endswith("overhead 2 GiB per GPU, over 2 GPUs)")


# --- the three cases ------------------------------------------------------------------------

def test_13b_bf16_on_one_gpu_goes_to_an_h100_never_an_l4():
    ms = llm(parameters="13B", quantizations=("bf16",))
    (fit,) = placement.fit_variants(ms, NODES, MEMORY)
    assert fit.problem is None and fit.verdict == "Fits"
    assert 23034 < fit.estimate.per_gpu_mib <= 81559  # more than an L4, less than an H100
    dep = deployment_of(build_children(ms, SETTINGS), "m-bf16")
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": MEMORY, "operator": "Gt", "values": [str(fit.estimate.per_gpu_mib - 1)]}]}]


def test_70b_int4_on_one_gpu_fits_an_h100_with_the_default_limits():
    ms = llm(quantizations=("int4-weight-only",))
    (fit,) = placement.fit_variants(ms, NODES, MEMORY)
    assert fit.problem is None
    assert fit.estimate.weights == 35_000_000_000
    assert fit.estimate.per_gpu_mib <= 81559


def test_70b_full_precision_pinned_to_an_l4_is_refused_with_the_numbers():
    ms = llm(quantizations=("none",), product=L4)
    (fit,) = placement.fit_variants(ms, NODES, MEMORY)
    assert fit.verdict == "Insufficient"
    assert fit.problem.message == (
        "Variant none needs ~273 GiB per GPU (70B parameters at fp32: 261 GiB, KV cache 10 GiB for "
        "4096 tokens (dense upper bound), overhead 2 GiB); the largest NVIDIA-L4 has 22 GiB; the smallest configuration of "
        "NVIDIA-L4 that holds it: resources.gpu.count 1 x gpu.nodes 14 (~21.3 GiB per GPU), which spans "
        "nodes (the operator's multiNode switch, with KubeRay): use more GPUs "
        "(resources.gpu.count), an int4-weight-only variant (~45 GiB per GPU), or GPUs with more memory.")


def test_a_too_small_named_product_points_at_gpus_that_would_hold_it():
    fit, = placement.fit_variants(llm(parameters="13B", product=L4), NODES, MEMORY)
    assert "the largest NVIDIA-L4 has 22 GiB" in fit.problem.message
    assert "NVIDIA-H100-80GB-HBM3 GPUs in the cluster would hold it (resources.gpu.product)" in fit.problem.message


def test_70b_fp16_on_one_gpu_fits_no_gpu_of_the_cluster():
    fit, = placement.fit_variants(llm(quantizations=("fp16",)), NODES, MEMORY)
    assert "the largest NVIDIA-H100-80GB-HBM3 has 79 GiB" in fit.problem.message


@pytest.mark.parametrize(("nodes", "product", "says"), [
    ((), None, "no node has a nvidia.com/gpu.memory label"),
    (NODES, "NVIDIA-A100-SXM4-40GB", "no node has nvidia.com/gpu.product=NVIDIA-A100-SXM4-40GB and a"),
])
def test_no_such_gpus_in_the_cluster(nodes, product, says):
    fit, = placement.fit_variants(llm(parameters="7B", product=product), nodes, MEMORY)
    assert says in fit.problem.message and fit.problem.message.startswith("Variant bf16 needs ~")


def test_offline_nothing_is_refused():
    fit, = placement.fit_variants(llm(quantizations=("none",), product=L4), None, MEMORY)
    assert fit.problem is None and fit.verdict == "Unknown"


def test_gpu_node_from_labels():
    labels = {MEMORY: "81559", "nvidia.com/gpu.product": H100}
    assert placement.GpuNode.from_labels("n", labels, MEMORY, "nvidia.com/gpu.product") == NODES[0].__class__(
        "n", 81559, H100, labels=tuple(sorted(labels.items())))
    # GPU feature discovery's count label, unless the node's allocatable GPUs say
    counted = {**labels, "nvidia.com/gpu.count": "8"}
    assert placement.GpuNode.from_labels("n", counted, MEMORY, "nvidia.com/gpu.product").gpus == 8
    assert placement.GpuNode.from_labels("n", counted, MEMORY, "nvidia.com/gpu.product", gpus=4).gpus == 4
    for bad in ({}, {MEMORY: ""}, {MEMORY: "0"}, {MEMORY: "80GB"}, {MEMORY: "-1"}):
        assert placement.GpuNode.from_labels("n", bad, MEMORY, "nvidia.com/gpu.product") is None


# --- placement --------------------------------------------------------------------------------------

def test_memory_requirement_joins_every_term_of_the_users_affinity():
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchExpressions": [
                    {"key": "nvidia.com/gpu.product", "operator": "In", "values": [L4]}]}}],
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    ms = llm(parameters="13B", quantizations=("int4-weight-only",), affinity=user)
    affinity = deployment_of(build_children(ms, SETTINGS), "m-int4")["spec"]["template"]["spec"]["affinity"]
    need = one_estimate(ms).per_gpu_mib
    requirement = {"key": MEMORY, "operator": "Gt", "values": [str(need - 1)]}
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [{"key": "zone", "operator": "In", "values": ["a"]}, requirement]
    assert terms[1] == {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
                        "matchExpressions": [requirement]}
    assert affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == \
        user["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert affinity["podAntiAffinity"] == user["podAntiAffinity"]
    # the spec's own affinity is not changed by building from it
    assert ms.spec.scheduling.affinity == user


def test_each_variant_gets_its_own_requirement_and_the_product_stays_a_selector():
    ms = llm(quantizations=("int4-weight-only", "bf16"), gpus=2, product=H100)
    children = build_children(ms, SETTINGS)
    needs = {f.variant: f.estimate.per_gpu_mib for f in placement.fit_variants(ms, None, MEMORY)}
    for variant in ("int4", "bf16"):
        pod = deployment_of(children, f"m-{variant}")["spec"]["template"]["spec"]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]
        assert term["matchExpressions"][0]["values"] == [str(needs[variant] - 1)]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == H100
    assert needs["int4"] < needs["bf16"]


def test_without_parameter_count_placement_is_as_before():
    pod = deployment_of(build_children(llm(parameters=None), SETTINGS), "m-bf16")["spec"]["template"]["spec"]
    assert "affinity" not in pod
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "KUBEMAAS_KV_CACHE_TOKENS" not in env  # the runtime's own default budget


def test_the_kv_budget_estimated_is_the_one_the_runtime_gets():
    env = {e["name"]: e["value"] for e in deployment_of(build_children(llm(), SETTINGS), "m-bf16")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEMAAS_KV_CACHE_TOKENS"] == str(gpufit.DEFAULT_KV_CACHE_TOKENS)
    assert "KUBEMAAS_MAX_MODEL_LEN" not in env


@pytest.mark.parametrize(("parameters", "seconds"), [
    (None, 1800), ("7B", 1800),                                  # the setting covers it
    ("70B", 600 + math.ceil(140e9 / (100 * 2**20))),             # 16-bit weights at 100 MiB/s
    ("405B", 600 + math.ceil(810e9 / (100 * 2**20))),
])
@pytest.mark.parametrize("engine", ["builtin", "vllm"])
def test_startup_probe_gives_a_large_model_time_to_load(parameters, seconds, engine):
    """vLLM compiles, captures graphs and allocates its KV cache after loading: more on top."""
    ms = llm(parameters=parameters, runtime={"engine": engine})
    pod = deployment_of(build_children(ms, SETTINGS), "m-bf16")["spec"]["template"]["spec"]
    probe = pod["containers"][0]["startupProbe"]
    seconds += gpufit.VLLM_EXTRA_SECONDS if engine == "vllm" else 0
    assert probe["periodSeconds"] * probe["failureThreshold"] == seconds - seconds % probe["periodSeconds"]


# --- the reconcile's decision and the status --------------------------------------------------------

def large_model(product=None):
    ms = llm(quantizations=("int4-weight-only", "none"), product=product)
    return ms.model_copy(update={"metadata": ms.metadata.model_copy(update={"generation": 3})})


def test_a_refused_variant_gets_no_deployment_and_the_others_do():
    plan = decide(large_model(), SETTINGS, None, gpu_nodes=NODES)
    names = {c["metadata"]["name"] for c in plan.children if c["kind"] == "Deployment"}
    assert names == {"m-int4"}  # none (fp32, ~273 GiB) fits no GPU: no Deployment, no Pending pod
    assert "m-none" in plan.keep  # one of an earlier revision, if any, is left serving, not pruned
    assert all(name != "m-none" for name, _ in plan.scales)
    assert plan.refused.reason == "GPUMemoryInsufficient"
    assert plan.refused.message.startswith("Variant none needs ~273 GiB per GPU")


def test_offline_every_variant_is_built():
    plan = decide(large_model(), SETTINGS, None, gpu_nodes=None)
    assert {c["metadata"]["name"] for c in plan.children if c["kind"] == "Deployment"} == {"m-int4", "m-none"}
    assert plan.refused is None


def test_status_shows_the_estimate_and_the_refusal():
    plan = decide(large_model(), SETTINGS, None, gpu_nodes=NODES)
    obs = Observation(name="m", namespace="ns", generation=3, selector=plan.selector, url=plan.url,
                      runtime_image=plan.runtime_image, variants=plan.variants, blocking=plan.refused,
                      refused=True, rollout=rollout_status(plan))
    status = placement.with_fit_status(compute_status(obs), plan.fits).to_wire()
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "GPUMemoryInsufficient")
    assert "the largest NVIDIA-H100-80GB-HBM3 has 79 GiB" in ready["message"]
    by_name = {v["name"]: v for v in status["variants"]}
    assert by_name["int4"]["gpuFit"] == "Fits" and by_name["none"]["gpuFit"] == "Insufficient"
    assert by_name["none"]["gpuMemoryEstimate"].startswith("needs ~273 GiB per GPU (70B parameters at fp32")
    assert by_name["int4"]["gpuMemoryMiB"] == plan.fits[0].estimate.per_gpu_mib
    assert status["gpuMemory"] == "int4 ~45GiB/GPU, none ~273GiB/GPU (no fit)"
    assert status["url"] == "http://m.ns.svc.cluster.local/v1"
    # not on its way: the rollout says Refused, with why
    assert status["rollout"]["phase"] == "Refused"
    assert status["rollout"]["message"].startswith("Variant none needs ~273 GiB per GPU")


def test_status_without_an_estimate_is_unchanged():
    plan = decide(llm(parameters=None), SETTINGS, None, gpu_nodes=NODES)
    obs = Observation(name="m", namespace="ns", generation=1, selector=plan.selector, url=plan.url,
                      runtime_image=plan.runtime_image, variants=plan.variants)
    status = compute_status(obs).to_wire()
    assert placement.with_fit_status(status, plan.fits) == status



def test_render_prints_each_variants_estimate():
    import io

    from kubemaas_operator.render import run_render

    from tests.unit.support import REPO

    out, err = io.StringIO(), io.StringIO()
    assert run_render([str(REPO / "examples" / "llm-h100.yaml")], "ml", SETTINGS, out=out, err=err) == 0
    comments = [line for line in out.getvalue().splitlines() if line.startswith("# GPU fit:")]
    assert comments == [
        ("# GPU fit: variant int4 needs ~29 GiB per GPU (70B parameters at int4: 33 GiB, KV cache 20 GiB for "
        "8192 tokens (dense upper bound), overhead 2 GiB per GPU, over 2 GPUs)"),
        ("# GPU fit: variant bf16 needs ~78 GiB per GPU (70B parameters at bf16: 130 GiB, KV cache 20 GiB for "
        "8192 tokens (dense upper bound), overhead 2 GiB per GPU, over 2 GPUs)"),
    ]


def test_the_operator_tells_no_node_seen_from_no_gpu_node():
    from kubemaas_operator.handlers import GPU_NODES, NODES, _gpu_nodes

    assert _gpu_nodes({}) is None  # nodes not readable: place without refusing
    assert _gpu_nodes({NODES: ["cpu-0"]}) == ()  # nodes, none with GPUs: refuse
    index = {NODES: ["a", "b"], GPU_NODES: [placement.GpuNode("b", 1, None), placement.GpuNode("a", 2, None)]}
    assert _gpu_nodes(index) == (placement.GpuNode("a", 2, None), placement.GpuNode("b", 1, None))  # by name


# --- across nodes: count x nodes, the smallest configuration, the user's selector -----------------

def across(parameters="405B", quantization="bf16", gpus=8, nodes=1, product=None, scheduling=None):
    spec = {"model": {"uri": "hf://org/llm", "format": "transformers", "task": "text-generation",
                      "parameterCount": parameters},
            "resources": {"gpu": {"count": gpus, "nodes": nodes, **({"product": product} if product else {})}},
            "variants": [{"name": "main", "quantization": quantization}]}
    if scheduling:
        spec["scheduling"] = scheduling
    return make_ms(spec)


@pytest.mark.parametrize(("gpus", "nodes", "total"), [(8, 1, 8), (8, 2, 16), (4, 3, 12), (1, 1, 1)])
def test_the_estimate_divides_by_count_times_nodes(gpus, nodes, total):
    ms = across(gpus=gpus, nodes=nodes)
    need = one_estimate(ms)
    assert need.gpus == total and need.nodes == nodes
    assert need.per_gpu == math.ceil((need.weights + need.kv_cache) / total) + need.overhead
    if nodes > 1:
        assert need.parts().endswith(f"per GPU, over {total} GPUs: {gpus} on each of {nodes} nodes")


# (count per node, nodes) that first holds the model, on the largest GPUs present
@pytest.mark.parametrize(("parameters", "quantization", "node", "expected"), [
    ("405B", "bf16", NODES[0], (8, 2)),     # 810 GB: more than one node of 8 H100s
    ("70B", "bf16", NODES[0], (2, 1)),      # fits 2 H100s of one node
    ("405B", "bf16", NODES[2], (1, 39)),    # L4 nodes with one GPU each
    ("13B", "int4-weight-only", NODES[2], (1, 1)),
])
def test_the_smallest_configuration_that_holds_a_model(parameters, quantization, node, expected):
    ms = across(parameters=parameters, quantization=quantization, gpus=1)
    (variant,) = ms.spec.variants
    count, nodes, need = placement.smallest_fit(ms, variant, node)
    assert (count, nodes) == expected and need.per_gpu_mib <= node.memory_mib
    fewer = []  # one node fewer (each full), or half the GPUs on as many nodes: neither holds it
    if nodes > 1:
        fewer.append(gpufit.estimate(ms, variant, gpus=node.gpus, nodes=nodes - 1))
    if count > 1:
        fewer.append(gpufit.estimate(ms, variant, gpus=count // 2, nodes=nodes))
    assert all(f.per_gpu_mib > node.memory_mib for f in fewer)


def test_405b_on_l4s_only_is_refused_naming_the_smallest_configuration():
    (fit,) = placement.fit_variants(across(product=L4, gpus=1), NODES, MEMORY)
    assert fit.verdict == "Insufficient"
    assert ("the smallest configuration of NVIDIA-L4 that holds it: resources.gpu.count 1 x gpu.nodes 39 "
            "(~22.2 GiB per GPU), which spans nodes") in fit.problem.message


def test_405b_over_two_h100_nodes_fits_the_estimate_and_is_refused_as_multi_node():
    ms = across(gpus=8, nodes=2, product=H100)
    (fit,) = placement.fit_variants(ms, NODES, MEMORY)
    assert fit.problem is None  # ~52 GiB per GPU over 16 H100s
    plan = decide(ms, SETTINGS, None, gpu_nodes=NODES)
    assert plan.refused.reason == "MultiNodeNotSupported"
    assert "resources.gpu.nodes 2" in plan.refused.message and "use gpu.nodes 1" in plan.refused.message
    assert not [c for c in plan.children if c["kind"] == "Deployment"]


def test_the_refusal_looks_only_at_nodes_the_users_selector_allows():
    labelled = tuple(placement.GpuNode(n.name, n.memory_mib, n.product, n.gpus,
                                    labels=(("pool", "h100" if n.product == H100 else "l4"),))
                     for n in NODES)
    # 13B bf16 (~30 GiB) fits an H100, but the user's selector allows only the L4 pool
    for scheduling in ({"nodeSelector": {"pool": "l4"}},
                       {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                           "nodeSelectorTerms": [{"matchExpressions": [
                               {"key": "pool", "operator": "NotIn", "values": ["h100"]}]}]}}}}):
        ms = across(parameters="13B", gpus=1, scheduling=scheduling)
        (fit,) = placement.fit_variants(ms, labelled, MEMORY)
        assert fit.problem is not None
        assert "the largest NVIDIA-L4 among the nodes scheduling.nodeSelector and affinity allow" in fit.problem.message
    allowed = across(parameters="13B", gpus=1, scheduling={"nodeSelector": {"pool": "h100"}})
    assert placement.fit_variants(allowed, labelled, MEMORY)[0].problem is None
    nowhere = across(parameters="13B", gpus=1, scheduling={"nodeSelector": {"pool": "tpu"}})
    assert "no node that scheduling.nodeSelector and affinity allow" in placement.fit_variants(nowhere, labelled, MEMORY)[0].problem.message


@pytest.mark.parametrize(("op", "values", "value", "ok"), [
    ("In", ["a"], "a", True), ("In", ["a"], "b", False), ("NotIn", ["a"], None, True),
    ("Exists", [], "x", True), ("Exists", [], None, False), ("DoesNotExist", [], None, True),
    ("Gt", ["10"], "11", True), ("Gt", ["10"], "10", False), ("Lt", ["10"], "9", True), ("Gt", ["10"], "x", False),
])
def test_node_selector_operators_as_the_scheduler_reads_them(op, values, value, ok):
    node = placement.GpuNode("n", 81559, H100, labels=(("k", value),) if value is not None else ())
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": op, "values": values}]}]}}}
    assert placement.allowed_by_scheduling(across(scheduling={"affinity": affinity}), node) is ok


def test_model_shape_sharpens_the_kv_estimate():
    """Llama-3.1-70B: 80 layers, 8 KV heads of 128 (GQA): 320 KiB a token in bf16, about 1/8 of the
    dense bound; fp8 halves it; without a shape the estimate says it is the dense upper bound."""
    dense = one_estimate(llm())
    shaped = llm()
    body = shaped.model_dump(by_alias=True, exclude_none=True)
    body["spec"]["model"]["shape"] = {"layers": 80, "kvHeads": 8, "headDim": 128}
    from kubemaas_operator.api import ModelService
    gqa = one_estimate(ModelService.model_validate(body))
    assert gqa.kv_cache == gpufit.DEFAULT_KV_CACHE_TOKENS * 2 * 80 * 8 * 128 * 2
    assert dense.kv_cache > 7 * gqa.kv_cache and gqa.weights == dense.weights
    assert "(model.shape)" in gqa.parts() and "(dense upper bound)" in dense.parts()
    body["spec"]["model"]["shape"]["kvCacheDtype"] = "fp8"
    assert one_estimate(ModelService.model_validate(body)).kv_cache * 2 == gqa.kv_cache
