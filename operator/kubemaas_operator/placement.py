"""GPU fit, the placement: which nodes' GPUs hold a variant's estimate (`gpufit.py`), the
required node affinity that keeps its pods there, and, when no GPU in the cluster holds it, the
refusal a person reads.

Placement: a required node affinity `nvidia.com/gpu.memory Gt <need - 1>` (MiB, as NVIDIA GPU
feature discovery publishes it); the product stays a node selector. A variant that no GPU in the
cluster holds (none of the named product, or none at all, among the nodes the user's own
selector and affinity allow) gets no pods: `GPUMemoryInsufficient`, with the smallest
configuration that would hold it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubemaas_operator.api import ModelService, ModelServiceStatus, Variant
from kubemaas_operator.api.constants import MAX_GPU_NODES
from kubemaas_operator.gpufit import GIB, PRECISION, GpuEstimate, estimate
from kubemaas_operator.problem import Problem

FIT_REASON = "GPUMemoryInsufficient"


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
    """A variant's estimate and, when no GPU in the cluster holds it, why it gets no pods
    (a GPUMemoryInsufficient problem)."""

    variant: str
    estimate: GpuEstimate
    problem: Problem | None = None
    checked: bool = False  # against the cluster's GPUs (offline, as in `render`, it is not)

    @property
    def verdict(self) -> str:
        if not self.checked:
            return "Unknown"
        return "Insufficient" if self.problem else "Fits"


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
        text += ", which spans nodes (the operator's multiNode switch, with KubeRay)"
    return text


def _advice(ms: ModelService, variant: Variant) -> str:
    tips = ["use more GPUs (resources.gpu.count)"]
    if variant.quantization != "int4-weight-only":
        smaller = estimate(ms, variant.model_copy(update={"quantization": "int4-weight-only"}))
        if smaller is not None:
            tips.append(f"an int4-weight-only variant (~{smaller.per_gpu_gib} GiB per GPU)")
    tips.append("or GPUs with more memory")
    return ", ".join(tips)


def no_fit_message(ms: ModelService, variant: Variant, need: GpuEstimate, nodes: Iterable[GpuNode],
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


def fit_variants(ms: ModelService, nodes: Iterable[GpuNode] | None, memory_label: str) -> tuple[VariantFit, ...]:
    """Every variant's estimate; with `nodes` (the cluster's GPU nodes; None offline) also
    whether any holds it."""
    nodes = None if nodes is None else tuple(nodes)
    fits = []
    for variant in ms.spec.variants:
        need = estimate(ms, variant)
        if need is None:
            continue
        why = None if nodes is None else no_fit_message(ms, variant, need, nodes, memory_label)
        problem = None if why is None else Problem(FIT_REASON, why)
        fits.append(VariantFit(variant.name, need, problem, checked=nodes is not None))
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


def with_fit_status(status: ModelServiceStatus, fits: Iterable[VariantFit]) -> ModelServiceStatus:
    """`status` with each estimated variant's `gpuMemoryMiB` (per GPU), `gpuMemoryEstimate`
    (its parts) and `gpuFit` (Fits, Insufficient or Unknown), and the printer column `gpuMemory`."""
    fits = tuple(fits)
    if not fits:
        return status
    by_name = {f.variant: f for f in fits}
    variants = []
    for entry in status.variants or ():
        fit = by_name.get(entry.name)
        if fit is not None:
            entry = entry.model_copy(update={"gpu_memory_mib": fit.estimate.per_gpu_mib,
                                             "gpu_memory_estimate": fit.estimate.describe(),
                                             "gpu_fit": fit.verdict})
        variants.append(entry)
    return status.model_copy(update={"variants": variants, "gpu_memory": gpu_memory_summary(fits)})


def gpu_memory_summary(fits: Iterable[VariantFit]) -> str:
    """The printer column: `int4 ~44GiB/GPU, bf16 ~142GiB/GPU (no fit)`."""
    return ", ".join(f"{f.variant} {f.estimate.short()}" + (" (no fit)" if f.problem else "") for f in fits)
