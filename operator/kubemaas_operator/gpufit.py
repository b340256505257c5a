"""GPU fit: how much memory one pod of a variant needs per GPU, and where it can run.

The estimate (docs/api.md, "GPU fit"), for a ModelService with `model.parameterCount` and GPUs:

    per GPU = (weights + KV cache) / (tensor-parallel GPUs x gpu.nodes) + overhead
    weights = parameterCount x bytes per parameter of the variant's quantization
              (none: fp32, 4; fp16 and bf16: 2; int8: 1; int4: 0.5)
    KV cache = token budget x bytes per token (text-generation only; encoders have none)

The token budget is `runtime.kvCacheTokens`, else `maxNumSeqs` (default 16) x `maxModelLen`
(what the runtime reserves), else DEFAULT_KV_CACHE_TOKENS, which the operator then passes to the
runtime so the bound holds. The operator never reads the model's files, so its shape is unknown:
bytes per token are those of a dense transformer of that size (hidden ~ (128 P / 12)^(1/3),
layers = hidden / 128, K and V in 16 bits), an upper bound for models with grouped-query
attention. The overhead (CUDA context, allocator, activations) is OVERHEAD_GIB per GPU.

Placement: a required node affinity `nvidia.com/gpu.memory Gt <need - 1>` (MiB, as NVIDIA GPU
feature discovery publishes it); the product stays a node selector. A variant that no GPU in the
cluster holds (none of the named product, or none at all) gets no pods: `GPUMemoryInsufficient`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubemaas_operator import runtime_contract
from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.api.constants import MAX_GPU_NODES
from kubemaas_operator.engine import tensor_parallel_size

GIB = 1024**3
MIB = 1024**2
OVERHEAD_GIB = 2
DEFAULT_KV_CACHE_TOKENS = 4096
KV_BYTES_PER_VALUE = 2  # the runtime keeps K and V in 16 bits
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
FIT_REASON = "GPUMemoryInsufficient"

BYTES_PER_PARAMETER: dict[str, float] = {
    "none": 4, "fp16": 2, "bf16": 2, "int8-dynamic": 1, "int8-weight-only": 1, "int4-weight-only": 0.5,
}
PRECISION = {
    "none": "fp32", "fp16": "fp16", "bf16": "bf16", "int8-dynamic": "int8", "int8-weight-only": "int8",
    "int4-weight-only": "int4",
}

# Loading reads the weights as stored (16 bits a parameter for the large models) and then
# quantizes them; startup probes allow this rate from slow network storage, plus a base.
LOAD_BYTES_PER_SECOND = 100 * MIB
LOAD_BASE_SECONDS = 600
# vLLM then compiles the model, captures CUDA graphs and allocates its KV cache before it is
# ready (issue 24 measured ~150 s for a 135M model on 2 CPU cores): more time on top.
VLLM_EXTRA_SECONDS = 600


@dataclass(frozen=True)
class GpuEstimate:
    """One pod of one variant: its memory, in bytes, and the parts it is made of."""

    parameters: int
    quantization: str
    gpus: int  # that one copy of the model is split over, on all its nodes
    weights: int
    kv_cache: int
    kv_tokens: int
    overhead: int  # per GPU
    nodes: int = 1
    kv_from_shape: bool = False  # model.shape given; else the dense upper bound

    @property
    def per_gpu(self) -> int:
        return math.ceil((self.weights + self.kv_cache) / self.gpus) + self.overhead

    @property
    def per_gpu_mib(self) -> int:
        return math.ceil(self.per_gpu / MIB)

    @property
    def per_gpu_gib(self) -> int:
        return math.ceil(self.per_gpu / GIB)

    def parts(self) -> str:
        """`70B parameters at fp16: 130 GiB, KV cache 8 GiB, overhead 2 GiB`."""
        text = (f"{format_parameters(self.parameters)} parameters at {PRECISION[self.quantization]}: "
                f"{_gib(self.weights)} GiB")
        if self.kv_tokens:
            bound = "model.shape" if self.kv_from_shape else "dense upper bound"
            text += f", KV cache {_gib(self.kv_cache)} GiB for {self.kv_tokens} tokens ({bound})"
        text += f", overhead {_gib(self.overhead)} GiB"
        if self.nodes > 1:
            return text + f" per GPU, over {self.gpus} GPUs: {self.gpus // self.nodes} on each of {self.nodes} nodes"
        return text + (f" per GPU, over {self.gpus} GPUs" if self.gpus > 1 else "")

    def describe(self) -> str:
        return f"needs ~{self.per_gpu_gib} GiB per GPU ({self.parts()})"

    def short(self) -> str:
        """The printer column's text for one variant: `~44GiB/GPU`."""
        return f"~{self.per_gpu_gib}GiB/GPU"


@dataclass(frozen=True)
class GpuNode:
    """A node's GPUs as GPU feature discovery labels them, with the node's labels (a refusal
    looks only at the nodes the user's own selector and affinity allow)."""

    name: str
    memory_mib: int
    product: str | None = None
    gpus: int | None = None  # GPUs on the node (allocatable, else GFD's count label); None: unknown
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_labels(cls, name: str, labels: Mapping[str, str], memory_label: str,
                    product_label: str, gpus: int | None = None) -> GpuNode | None:
        raw = labels.get(memory_label, "")
        if not raw.isdigit() or int(raw) == 0:
            return None
        if gpus is None:  # GPU feature discovery's nvidia.com/gpu.count, beside its product label
            count = labels.get(product_label.rsplit(".", 1)[0] + ".count", "")
            gpus = int(count) if count.isdigit() else None
        return cls(name=name, memory_mib=int(raw), product=labels.get(product_label), gpus=gpus,
                   labels=tuple(sorted(labels.items())))


@dataclass(frozen=True)
class VariantFit:
    """A variant's estimate and, when no GPU in the cluster holds it, why it gets no pods."""

    variant: str
    estimate: GpuEstimate
    refusal: str | None = None
    checked: bool = False  # against the cluster's GPUs (offline, as in `render`, it is not)

    @property
    def verdict(self) -> str:
        if not self.checked:
            return "Unknown"
        return "Insufficient" if self.refusal else "Fits"


def _gib(size: float) -> int:
    return round(size / GIB)


def format_parameters(count: int) -> str:
    """70_000_000_000 -> 70B, 1_500_000_000 -> 1.5B, 135_000_000 -> 135M."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}" if count / scale < 1000 else f"{count // scale}{suffix}"
    return str(count)


def kv_bytes_per_token(parameters: int) -> int:
    """K and V of every layer of a dense transformer with `parameters` (shape unknown)."""
    hidden = (128 * parameters / 12) ** (1 / 3)
    layers = hidden / 128
    return math.ceil(2 * layers * hidden * KV_BYTES_PER_VALUE)


def operator_kv_cache_tokens(ms: ModelService) -> int | None:
    """The KV budget the operator passes when the user set no limit that bounds it: only with the
    fit check on (GPUs, parameterCount) for a text-generation model."""
    spec = ms.spec
    runtime = spec.runtime
    if (spec.uses_gpu and spec.model.parameters and spec.model.generative
            and runtime.kv_cache_tokens is None and runtime.max_model_len is None):
        return DEFAULT_KV_CACHE_TOKENS
    return None


def kv_cache_tokens(ms: ModelService) -> int:
    """The token budget the runtime reserves KV cache for (0 for a model that generates nothing)."""
    spec = ms.spec
    if not spec.model.generative:
        return 0
    runtime = spec.runtime
    if runtime.kv_cache_tokens is not None:
        return runtime.kv_cache_tokens
    if runtime.max_model_len is not None:
        return (runtime.max_num_seqs or runtime_contract.MAX_NUM_SEQS) * runtime.max_model_len
    return DEFAULT_KV_CACHE_TOKENS


def estimate(ms: ModelService, variant: Variant, gpus: int | None = None,
             nodes: int | None = None) -> GpuEstimate | None:
    """The per-GPU estimate of one variant's pod, or None without GPUs or parameterCount;
    ``gpus`` (per node) and ``nodes`` default to the spec's split."""
    parameters = ms.spec.model.parameters
    if not parameters or ms.spec.resources.gpu.count == 0:
        return None
    nodes = nodes or ms.spec.resources.gpu.nodes
    per_node = gpus or tensor_parallel_size(ms)  # the GPUs of a node that hold one copy's share
    tokens = kv_cache_tokens(ms)
    shape = ms.spec.model.shape
    per_token = (2 * shape.layers * shape.kv_heads * shape.head_dim * KV_DTYPE_BYTES[shape.kv_cache_dtype]
                 if shape is not None else kv_bytes_per_token(parameters))
    return GpuEstimate(
        parameters=parameters, quantization=variant.quantization, gpus=per_node * nodes, nodes=nodes,
        weights=math.ceil(parameters * BYTES_PER_PARAMETER[variant.quantization]),
        kv_cache=tokens * per_token, kv_tokens=tokens, overhead=OVERHEAD_GIB * GIB,
        kv_from_shape=shape is not None,
    )


GPUS_PER_NODE_STEPS = (1, 2, 4, 8, 16)
DEFAULT_GPUS_PER_NODE = 8  # where a node's GPU count is unknown


def smallest_fit(ms: ModelService, variant: Variant, node: GpuNode) -> tuple[int, int, GpuEstimate] | None:
    """The smallest (count per node, nodes) of ``node``'s kind that holds the variant: the fewest
    nodes (a replica over nodes costs most), then the fewest GPUs on each; None when not even
    MAX_GPU_NODES full nodes do."""
    most = node.gpus or DEFAULT_GPUS_PER_NODE
    options = [(nodes, count) for count in GPUS_PER_NODE_STEPS if count <= most
               for nodes in range(1, MAX_GPU_NODES + 1)]
    for nodes, count in sorted(options):
        need = estimate(ms, variant, gpus=count, nodes=nodes)
        if need is not None and need.per_gpu_mib <= node.memory_mib:
            return count, nodes, need
    return None


def _expression_matches(labels: Mapping[str, str], expr: Mapping[str, Any]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
    value = labels.get(key)
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and value is not None and value.lstrip("-").isdigit() and values:
        return int(value) > int(values[0]) if op == "Gt" else int(value) < int(values[0])
    return False


def allowed_by_scheduling(ms: ModelService, node: GpuNode) -> bool:
    """Whether the user's scheduling.nodeSelector and required node affinity admit the node (as
    the scheduler would: terms ORed, expressions ANDed; matchFields are not checked here)."""
    labels = dict(node.labels)
    sched = ms.spec.scheduling
    if any(labels.get(key) != value for key, value in sched.node_selector.items()):
        return False
    required = ((sched.affinity or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    return any(all(_expression_matches(labels, e) for e in term.get("matchExpressions") or [])
               for term in terms)


def startup_seconds(ms: ModelService, configured: int, engine: str = "builtin") -> int:
    """How long a pod may take to load its model: the operator setting, or more for a model so
    large that reading its 16-bit weights at LOAD_BYTES_PER_SECOND takes longer; the vLLM
    engine gets VLLM_EXTRA_SECONDS more on top (docs/api.md, "Startup probe")."""
    parameters = ms.spec.model.parameters
    load = LOAD_BASE_SECONDS + math.ceil(parameters * 2 / LOAD_BYTES_PER_SECOND) if parameters else 0
    return max(configured, load) + (VLLM_EXTRA_SECONDS if engine == "vllm" else 0)


def memory_requirement(need: GpuEstimate, memory_label: str) -> dict[str, Any]:
    """The node selector requirement: GPUs with at least the estimate (Gt is strict)."""
    return {"key": memory_label, "operator": "Gt", "values": [str(need.per_gpu_mib - 1)]}


def with_memory_requirement(affinity: dict[str, Any] | None, requirement: dict[str, Any]) -> dict[str, Any]:
    """The user's affinity with `requirement` added to every required node selector term (terms
    are ORed, expressions within one ANDed), or a first term holding it."""
    out = copy.deepcopy(affinity) if affinity else {}
    required = out.setdefault("nodeAffinity", {}).setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term.setdefault("matchExpressions", []).append(requirement)
    return out


def _smallest_text(ms: ModelService, variant: Variant, node: GpuNode) -> str:
    found = smallest_fit(ms, variant, node)
    kind = node.product or "GPU"
    if found is None:
        return f"; not even {MAX_GPU_NODES} nodes of {kind} hold it at {PRECISION[variant.quantization]}"
    count, nodes, need = found
    text = (f"; the smallest configuration of {kind} that holds it: resources.gpu.count {count} x "
            f"gpu.nodes {nodes} (~{need.per_gpu / GIB:.1f} GiB per GPU)")
    if nodes > 1:
        text += ", which spans nodes (MultiNodeNotSupported in this operator version)"
    return text


def _advice(ms: ModelService, variant: Variant) -> str:
    tips = ["use more GPUs (resources.gpu.count)"]
    if variant.quantization != "int4-weight-only":
        smaller = estimate(ms, variant.model_copy(update={"quantization": "int4-weight-only"}))
        if smaller is not None:
            tips.append(f"an int4-weight-only variant (~{smaller.per_gpu_gib} GiB per GPU)")
    tips.append("or GPUs with more memory")
    return ", ".join(tips)


def refusal(ms: ModelService, variant: Variant, need: GpuEstimate, nodes: Iterable[GpuNode],
            memory_label: str) -> str | None:
    """Why no node's GPUs hold `need`, phrased for a person, or None when one does."""
    nodes = tuple(nodes)
    product = ms.spec.resources.gpu.product
    allowed = [n for n in nodes if allowed_by_scheduling(ms, n)]
    candidates = [n for n in allowed if product is None or n.product == product]
    if any(n.memory_mib >= need.per_gpu_mib for n in candidates):
        return None
    head = f"Variant {variant.name} {need.describe()}"
    narrowed = len(allowed) < len(nodes)
    among = " among the nodes scheduling.nodeSelector and affinity allow" if narrowed else ""
    if not candidates:
        where = f"nvidia.com/gpu.product={product} and " if product else ""
        if narrowed:
            return (f"{head}; no node that scheduling.nodeSelector and affinity allow has {where}a "
                    f"{memory_label} label: widen the selector or the affinity, or add such nodes.")
        return (f"{head}; no node has {where}a {memory_label} label (NVIDIA GPU feature discovery "
                "publishes it): install GPU feature discovery or add such nodes; without "
                "model.parameterCount pods are placed without this check.")
    largest = max(candidates, key=lambda n: n.memory_mib)
    text = (f"{head}; the largest {largest.product or 'GPU'}{among} has {largest.memory_mib // 1024} GiB"
            f"{_smallest_text(ms, variant, largest)}: {_advice(ms, variant)}.")
    elsewhere = [n for n in nodes if n.memory_mib >= need.per_gpu_mib]
    if product and elsewhere:
        best = max(elsewhere, key=lambda n: n.memory_mib)
        text += f" {best.product or best.name} GPUs in the cluster would hold it (resources.gpu.product)."
    return text


def plan_fit(ms: ModelService, nodes: Iterable[GpuNode] | None, memory_label: str) -> tuple[VariantFit, ...]:
    """Every variant's estimate; with `nodes` (the cluster's GPU nodes; None offline) also
    whether any holds it."""
    nodes = None if nodes is None else tuple(nodes)
    fits = []
    for variant in ms.spec.variants:
        need = estimate(ms, variant)
        if need is None:
            continue
        why = None if nodes is None else refusal(ms, variant, need, nodes, memory_label)
        fits.append(VariantFit(variant.name, need, why, checked=nodes is not None))
    return tuple(fits)


def withheld_deployments(refused: Iterable[str], layouts: Iterable[Any]) -> frozenset[str]:
    """The Deployments (stable and canary) of the refused variants (by name): not written."""
    refused = set(refused)
    names = set()
    for layout in layouts:
        if layout.name in refused:
            names.add(layout.stable.deployment)
            if layout.canary is not None:
                names.add(layout.canary.deployment)
    return frozenset(names)


def with_fit_status(status: dict[str, Any], fits: Iterable[VariantFit]) -> dict[str, Any]:
    """`status` with each estimated variant's `gpuMemoryMiB` (per GPU), `gpuMemoryEstimate`
    (its parts) and `gpuFit` (Fits, Insufficient or Unknown), and the printer column `gpuMemory`."""
    fits = tuple(fits)
    if not fits:
        return status
    by_name = {f.variant: f for f in fits}
    variants = []
    for entry in status.get("variants", []):
        fit = by_name.get(entry["name"])
        if fit is not None:
            entry = {**entry, "gpuMemoryMiB": fit.estimate.per_gpu_mib,
                     "gpuMemoryEstimate": fit.estimate.describe(), "gpuFit": fit.verdict}
        variants.append(entry)
    return {**status, "variants": variants, "gpuMemory": gpu_memory_summary(fits)}


def gpu_memory_summary(fits: Iterable[VariantFit]) -> str:
    """The printer column: `int4 ~44GiB/GPU, bf16 ~142GiB/GPU (no fit)`."""
    return ", ".join(f"{f.variant} {f.estimate.short()}" + (" (no fit)" if f.refusal else "") for f in fits)
