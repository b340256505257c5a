"""GPU fit, the estimate: how much memory one pod of a variant needs per GPU, and how long it
may take to load.

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

Where a pod can run with that need, and the refusal when nowhere: `placement.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubemaas_operator import runtime_contract
from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.engine import compiles_decode, resolved_engine, tensor_parallel_size

GIB = 1024**3
MIB = 1024**2
OVERHEAD_GIB = 2
DEFAULT_KV_CACHE_TOKENS = 4096
KV_BYTES_PER_VALUE = 2  # the runtime keeps K and V in 16 bits
KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}

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
# The builtin engine with --compile decode compiles one inductor graph per batch bucket before
# it is ready (runtime_contract.compile_graphs: 5 at the default maxNumSeqs 16, 6 at 32, 13 at
# 4096). Measured on the project's shared 2-core machine with SmolLM2-135M (30 layers) at
# maxNumSeqs 32, 6 graphs: ready in 301 s with a cold inductor cache against 13-17 s eager, so
# ~48 s a graph; 121 s with a warm cache; in-process, 3 graphs took 228 s (76 s a graph)
# (docs/runtime.md, "Compiled decode"). A new pod's cache is always cold (it lives in the pod's
# /tmp emptyDir): allow 120 s a graph, ~1.6x the slowest measured, on top of the load budget.
COMPILE_SECONDS_PER_GRAPH = 120


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


def compile_seconds(ms: ModelService, variant: Variant) -> int:
    """The start-up allowance for the variant's compiled decode: COMPILE_SECONDS_PER_GRAPH for
    each graph the runtime compiles before it is ready, 0 when it does not compile."""
    if not compiles_decode(ms, variant):
        return 0
    seqs = ms.spec.runtime.max_num_seqs or runtime_contract.MAX_NUM_SEQS
    return COMPILE_SECONDS_PER_GRAPH * runtime_contract.compile_graphs(seqs)


def startup_seconds(ms: ModelService, variant: Variant, configured: int) -> int:
    """How long a pod of the variant may take to load its model: the operator setting, or more
    for a model so large that reading its 16-bit weights at LOAD_BYTES_PER_SECOND takes longer;
    on top, VLLM_EXTRA_SECONDS for the vLLM engine, or the compiled decode's allowance for the
    builtin engine with compile decode (docs/api.md, "Startup probe")."""
    parameters = ms.spec.model.parameters
    load = LOAD_BASE_SECONDS + math.ceil(parameters * 2 / LOAD_BYTES_PER_SECOND) if parameters else 0
    extra = VLLM_EXTRA_SECONDS if resolved_engine(ms, variant) == "vllm" else compile_seconds(ms, variant)
    return max(configured, load) + extra
