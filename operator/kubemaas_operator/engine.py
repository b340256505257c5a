"""Which engine serves a variant, over how many GPUs, and whether the runtime can do it.

The operator plans what the runtime can run (docs/api.md, "Engines"):

- ``auto`` resolves to ``vllm`` for a transformers text-generation model with GPUs, and to
  ``builtin`` otherwise (GGUF, encoders, torch archives, CPU). The resolved engine picks the
  runtime image's flavour; the pod is told the engine as the spec has it (``auto`` is the
  runtime's default and is not written), so the vLLM image may still fall back to builtin for
  an architecture vLLM lacks, on one GPU.
- One copy of the model is split over ``tensorParallelSize`` GPUs, default ``gpu.count``.
- The builtin engine runs a model on one device: a variant that resolves to it with more than
  one GPU is refused before any pod (``EngineCannotShard``), never placed across GPUs and then
  loaded onto one of them.
"""

from __future__ import annotations

from typing import Literal

from kubemaas_operator.api import ModelService, Variant

ResolvedEngine = Literal["builtin", "vllm"]
ENGINE_REASON = "EngineCannotShard"
MULTI_NODE_REASON = "MultiNodeNotSupported"


def resolved_engine(ms: ModelService, variant: Variant) -> ResolvedEngine:
    """builtin or vllm: the variant's engine with ``auto`` decided (the spec decides it, so the
    API's compile rule and the builders resolve alike)."""
    return ms.spec.resolved_engine(variant)


def compiles_decode(ms: ModelService, variant: Variant) -> bool:
    """Whether the variant's pods run ``--compile decode``: it asks for decode (the API admits
    that only on the builtin engine, for text generation, without adapters)."""
    return ms.spec.compile_of(variant) == "decode" and resolved_engine(ms, variant) == "builtin"


def tensor_parallel_size(ms: ModelService) -> int:
    """GPUs one copy of the model is split over: runtime.tensorParallelSize, else gpu.count
    (1 on CPU)."""
    return ms.spec.runtime.tensor_parallel_size or max(ms.spec.resources.gpu.count, 1)


def multi_node_refusal(ms: ModelService, variant: Variant, enabled: bool = False) -> str | None:
    """A replica over several nodes is a RayCluster (multinode.py) where the operator's
    multiNode switch is on; off, it is refused before any pod, never half-placed."""
    nodes = ms.spec.resources.gpu.nodes
    if nodes <= 1 or enabled:
        return None
    return (f"Variant {variant.name}: resources.gpu.nodes {nodes} asks for one replica across "
            f"{nodes} nodes, and this operator runs no multi-node child: enable multiNode in the "
            "chart (it needs KubeRay installed) or use gpu.nodes 1 (GPUs with more memory, more "
            "GPUs per node or a smaller quantization). No pod was created for it.")


def engine_refusal(ms: ModelService, variant: Variant) -> str | None:
    """Why the variant's engine cannot run on its pod's GPUs, phrased for a person, or None."""
    gpus = ms.spec.resources.gpu.count
    nodes = ms.spec.resources.gpu.nodes
    if resolved_engine(ms, variant) != "builtin" or gpus * nodes <= 1:
        return None
    where = f"pod's {gpus} GPUs (resources.gpu.count)" if nodes == 1 else \
        f"{nodes} nodes (resources.gpu.nodes), {gpus} GPUs each"
    asked = ms.spec.engine_of(variant)
    which = "engine builtin" if asked == "builtin" else "engine auto, which takes builtin here,"
    model = ms.spec.model
    vllm_can = model.format == "transformers" and model.task == "text-generation"
    note = "" if vllm_can else " (engine vllm needs model.format transformers, task text-generation)"
    return (f"Variant {variant.name}: {which} runs a model on one GPU and cannot split it over the "
            f"{where}: use engine: vllm or one GPU{note}. "
            "No pod was created for it.")
