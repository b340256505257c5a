"""`ModelService.spec`: what to serve, where, how many, and how traffic splits.

Descriptions become the CRD's `kubectl explain` text. Every cross-field rule is a
:class:`~kubemaas_operator.api.rules.CelRule` attached to the model it reads (so the API
server enforces it) and checked again here (so `render` refuses the same specs offline).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kubemaas_operator.api import rules
from kubemaas_operator.api.access import NetworkAccess, RuntimeAuth
from kubemaas_operator.api.base import ApiModel, DnsLabel, DnsSubdomain, ParameterCount
from kubemaas_operator.api.compute import Resources, Scheduling
from kubemaas_operator.api.constants import (
    ADAPTER_QUANTIZATIONS,
    ADAPTER_SCHEMES,
    GENERATIVE_METRICS,
    MAX_ADAPTERS,
    MAX_GENERATION_TOKENS,
    MAX_GPUS_PER_POD,
    MAX_REPLICAS,
    MAX_URI_LENGTH,
    MAX_VARIANT_NAME_LENGTH,
    MAX_VARIANTS,
    PICKER_SUFFIX,
    QUANTIZATION_DEVICES,
    TASKED_FORMATS,
    URI_SCHEMES,
    URI_SHAPE_PATTERN,
    CompileMode,
    Engine,
    ModelCacheMode,
    ModelFormat,
    ModelTask,
    Quantization,
    Routing,
)
from kubemaas_operator.api.delivery import Autoscaling, Rollout

_SCHEME_RE = re.compile(r"^(" + "|".join(URI_SCHEMES) + ")://")
_SHAPE_RE = re.compile(URI_SHAPE_PATTERN)
_HF_WITH_PATH_RE = re.compile(r"^hf://[^/@]+/[^/@]+/")
_HF_GGUF_FILE_RE = re.compile(r"^hf://[^/@]+/[^/@]+/[^@]+[.]gguf(@.*)?$")
_SIZE_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


class SecretReference(ApiModel):
    """A Secret in the ModelService's namespace."""

    name: DnsSubdomain = Field(description="Name of the Secret.")


KvCacheDtype = Literal["fp32", "fp16", "bf16", "fp8"]


class ModelShape(ApiModel):
    """The model's attention shape, for the GPU-fit check's KV-cache estimate."""

    layers: Annotated[int, Field(ge=1, le=1024)] = Field(description="Transformer layers (num_hidden_layers).")
    kv_heads: Annotated[int, Field(ge=1, le=1024)] = Field(
        description="Key/value heads per layer (num_key_value_heads; fewer than the query heads with GQA)."
    )
    head_dim: Annotated[int, Field(ge=1, le=4096)] = Field(description="Dimension of one head (head_dim).")
    kv_cache_dtype: KvCacheDtype = Field(
        default="bf16",
        description=(
            "What the engine keeps K and V in: fp32, fp16, bf16 (default) or fp8. Only the estimate "
            "reads it; the runtime is not told."
        ),
    )


class ModelSource(ApiModel):
    """Where the model is and how to load it."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(
        rules.URI_SCHEME, rules.URI_SHAPE, rules.ARCHITECTURE_FOR_SAFETENSORS,
        rules.TASK_FOR_TRANSFORMERS, rules.TASK_ONLY_FOR_TRANSFORMERS, rules.GGUF_IS_TEXT_GENERATION,
        rules.HF_GGUF_NAMES_A_FILE, rules.HF_PATH_ONLY_FOR_GGUF, rules.CACHE_ONLY_FOR_DOWNLOADS,
    ))

    uri: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI_LENGTH)] = Field(
        description=(
            "Where the model files are: pvc://<claim>[/<path>] (mounted read-only at "
            "/mnt/models), file:///<path> (already in the runtime image), s3://<bucket>/<key> "
            "or hf://<org>/<name>[@<revision>] (downloaded into /mnt/models by an init "
            "container before the server starts); with format gguf, hf://<org>/<name>/<file>.gguf "
            "names one file of the repo."
        )
    )
    format: ModelFormat = Field(
        description=(
            "How the model is stored: torchscript (torch.jit archive), exported-program "
            "(torch.export archive), safetensors (a bare state dict; needs architecture), "
            "transformers (a Hugging Face model directory) or gguf (a GGUF causal LM file, "
            "task text-generation)."
        )
    )
    task: ModelTask | None = Field(
        default=None,
        description=(
            "What the model computes: feature-extraction, text-classification or text-generation "
            "(an OpenAI-compatible chat model under /v1). Required for transformers; gguf is "
            "text-generation."
        ),
    )
    parameter_count: ParameterCount | None = Field(
        default=None,
        description=(
            "The model's size in parameters, as \"135M\", \"7B\", \"70B\" or a plain integer. "
            "With GPUs it enables the GPU-fit check: each variant's per-GPU memory is estimated "
            "from it and its quantization, and pods are placed only on GPUs that hold it "
            "(docs/api.md, GPU fit)."
        ),
    )
    shape: ModelShape | None = Field(
        default=None,
        description=(
            "The model's attention shape (from its config.json): with it the GPU-fit check "
            "estimates the KV cache as 2 x layers x kvHeads x headDim x bytes per token; without "
            "it, a dense transformer of parameterCount's size, an upper bound (docs/api.md, GPU fit)."
        ),
    )
    architecture: Annotated[
        str,
        StringConstraints(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"),
    ] | None = Field(
        default=None,
        description=(
            "For format safetensors: pkg.module:factory, a function in the runtime image that "
            "returns the torch.nn.Module the state dict is loaded into."
        ),
    )
    secret_ref: SecretReference | None = Field(
        default=None,
        description=(
            "A Secret whose keys become environment variables of the download step only (for "
            "s3://: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...; for hf://: "
            "HF_TOKEN). The serving container never sees it."
        ),
    )
    cache: ModelCacheMode = Field(
        default="none",
        description=(
            "node: keep one copy of the downloaded model (s3://, hf://) per node, keyed by the URI "
            "with its revision, in the node-local model cache: the first pod on a node fills it, "
            "later pods on that node mount it read-only and skip the download, pods prefer nodes "
            "that hold it, and a copy no ModelService refers to is evicted. none (default): each "
            "pod downloads into its own emptyDir (docs/api.md, Node-local model cache)."
        ),
    )

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @model_validator(mode="after")
    def _check_rules(self) -> ModelSource:
        if not _SCHEME_RE.search(self.uri):
            raise rules.violation(rules.URI_SCHEME)
        if not _SHAPE_RE.search(self.uri) or "\n" in self.uri:
            raise rules.violation(rules.URI_SHAPE)
        if self.format == "safetensors" and self.architecture is None:
            raise rules.violation(rules.ARCHITECTURE_FOR_SAFETENSORS)
        if self.format == "transformers" and self.task is None:
            raise rules.violation(rules.TASK_FOR_TRANSFORMERS)
        if self.task is not None and self.format not in TASKED_FORMATS:
            raise rules.violation(rules.TASK_ONLY_FOR_TRANSFORMERS)
        if self.format == "gguf" and self.task not in (None, "text-generation"):
            raise rules.violation(rules.GGUF_IS_TEXT_GENERATION)
        if self.format == "gguf" and self.scheme == "hf" and not _HF_GGUF_FILE_RE.search(self.uri):
            raise rules.violation(rules.HF_GGUF_NAMES_A_FILE)
        if self.format != "gguf" and _HF_WITH_PATH_RE.search(self.uri):
            raise rules.violation(rules.HF_PATH_ONLY_FOR_GGUF)
        if self.cache == "node" and self.scheme not in ("s3", "hf"):
            raise rules.violation(rules.CACHE_ONLY_FOR_DOWNLOADS)
        return self

    @property
    def generative(self) -> bool:
        """A text-generation model: served under /v1 (OpenAI API) with generation limits."""
        return self.format == "gguf" or self.task == "text-generation"

    @property
    def runtime_task(self) -> str | None:
        """The task the runtime is told: gguf is always text-generation."""
        return "text-generation" if self.format == "gguf" else self.task

    @property
    def parameters(self) -> int | None:
        """parameterCount as a number ("7B" -> 7_000_000_000), or None when unset."""
        value = self.parameter_count
        if value is None or isinstance(value, int):
            return value
        if value[-1] in _SIZE_SUFFIX:
            whole, _, fraction = value[:-1].partition(".")
            scale = _SIZE_SUFFIX[value[-1]]
            return int(whole) * scale + (int(fraction) * scale // 10 ** len(fraction) if fraction else 0)
        return int(value)


class RuntimeSpec(ApiModel):
    """The serving runtime's configuration (KUBEMAAS_* variables of the runtime container)."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(rules.KV_CACHE_HOLDS_ONE_SEQUENCE))

    image: Annotated[str, StringConstraints(max_length=512)] = Field(
        default="",
        description=(
            "Runtime image; empty: the image recorded in status.runtimeImage, or the operator's "
            "default for a new ModelService (so upgrading the operator restarts no model)."
        ),
    )
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=32, description="Largest batch the server runs at once."
    )
    batch_timeout_ms: Annotated[int, Field(ge=0, le=10000)] = Field(
        default=0,
        description="How long a batch may wait for more requests; 0 runs as soon as the model is free.",
    )
    max_model_len: Annotated[int, Field(ge=1, le=MAX_GENERATION_TOKENS)] | None = Field(
        default=None,
        description=(
            "text-generation: longest context of one sequence (prompt + generated tokens), "
            "KUBEMAAS_MAX_MODEL_LEN. Empty: the model's own."
        ),
    )
    max_num_seqs: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        default=None,
        description=(
            "text-generation: most sequences decoded together, KUBEMAAS_MAX_NUM_SEQS. Empty: the "
            "runtime's default (16)."
        ),
    )
    kv_cache_tokens: Annotated[int, Field(ge=1, le=MAX_GENERATION_TOKENS)] | None = Field(
        default=None,
        description=(
            "text-generation: KV-cache token budget over all running sequences, "
            "KUBEMAAS_KV_CACHE_TOKENS; requests beyond it wait in the queue. Empty: maxNumSeqs x "
            "maxModelLen, or with the GPU-fit check and neither limit set, the operator's "
            "default budget (docs/api.md, GPU fit)."
        ),
    )
    max_drift: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description=(
            "Largest output drift a quantized variant may show against the unquantized model at "
            "warm-up; beyond it the runtime exits with QuantizationDriftExceeded. Empty: the "
            "runtime's default."
        ),
    )
    auth: RuntimeAuth | None = Field(
        default=None,
        description="Bearer-token auth on metadata and inference routes; health and metrics stay open.",
    )
    engine: Engine = Field(
        default="auto",
        description=(
            "The engine that serves the model, KUBEMAAS_ENGINE; a variant's engine overrides it. "
            "builtin (the runtime's PyTorch engine, one GPU), vllm (vLLM: model.format "
            "transformers, text-generation; splits a model over the pod's GPUs) or auto: vllm for "
            "a transformers text-generation model with GPUs, builtin otherwise. It also picks the "
            "runtime image's flavour (docs/api.md, Engines)."
        ),
    )
    tensor_parallel_size: Annotated[int, Field(ge=1, le=MAX_GPUS_PER_POD)] | None = Field(
        default=None,
        description=(
            "GPUs one copy of the model is split over, KUBEMAAS_TENSOR_PARALLEL_SIZE (vllm); "
            "must divide resources.gpu.count. Empty: resources.gpu.count."
        ),
    )
    compile: CompileMode = Field(
        default="off",
        description=(
            "text-generation, builtin engine: decode compiles the decode step with torch.compile "
            "(inductor) at batch buckets 1, 2, 4, ... up to maxNumSeqs before the pod is ready, "
            "KUBEMAAS_COMPILE; off (default) runs eager. The startup probe allows for the compile. "
            "Refused with engine vllm (or auto taking vllm) and with adapters; a variant's compile "
            "overrides it (docs/api.md, Compiled decode)."
        ),
    )

    @model_validator(mode="after")
    def _check_rules(self) -> RuntimeSpec:
        if (self.kv_cache_tokens is not None and self.max_model_len is not None
                and self.kv_cache_tokens < self.max_model_len):
            raise rules.violation(rules.KV_CACHE_HOLDS_ONE_SEQUENCE)
        return self


class Variant(ApiModel):
    """One quantization of the model, served by its own Deployment <name>-<variant>."""

    name: Annotated[DnsLabel, StringConstraints(max_length=MAX_VARIANT_NAME_LENGTH)] = Field(
        description="Variant name (a DNS label); names its Deployment and Service <name>-<variant>."
    )
    quantization: Quantization = Field(
        default="none",
        description=(
            "none, fp16, bf16, int8-dynamic (CPU only), int8-weight-only or int4-weight-only."
        ),
    )
    weight: Annotated[int, Field(ge=0, le=100)] = Field(
        default=100,
        description=(
            "Percent of traffic and of spec.replicas; the weights of all variants sum to 100."
        ),
    )
    engine: Engine | None = Field(
        default=None, description="This variant's engine (auto, builtin or vllm); empty: runtime.engine."
    )
    compile: CompileMode | None = Field(
        default=None, description="This variant's compiled decode (off or decode); empty: runtime.compile."
    )


class GatewayRef(ApiModel):
    """A Gateway API Gateway to attach an HTTPRoute to, for exact per-variant weights."""

    name: DnsSubdomain = Field(description="Name of the Gateway.")
    namespace: DnsLabel | None = Field(
        default=None, description="Namespace of the Gateway; default: the ModelService's."
    )
    section_name: DnsLabel | None = Field(default=None, description="A listener of the Gateway.")


class Adapter(ApiModel):
    """A LoRA adapter of the model, served as the model name `name` (docs/api.md "LoRA adapters")."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(rules.ADAPTER_URI_SCHEME))

    name: DnsLabel = Field(description="The model name requests use for this adapter (the `model` field).")
    uri: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI_LENGTH)] = Field(
        description=(
            "Where the adapter directory (adapter_config.json, adapter_model.safetensors) is: "
            "s3://bucket/prefix, hf://org/name@revision (pinned, as for the model) or file:///path in the "
            "image. Fetched beside the model with the model's secretRef."
        ),
    )

    @model_validator(mode="after")
    def _check_rules(self) -> Adapter:
        if not (self.uri.startswith(tuple(f"{s}://" for s in ADAPTER_SCHEMES))
                and _SHAPE_RE.search(self.uri)):
            raise rules.violation(rules.ADAPTER_URI_SCHEME)
        return self


def _default_variants() -> list[Variant]:
    return [Variant(name="default", quantization="none", weight=100)]


_SPEC_RULES = [
    rules.QUANTIZATION_ON_GPU, rules.CPU_METRIC_NEEDS_CPU_REQUEST, rules.SCALE_TO_ZERO_NEEDS_DEMAND_SIGNAL,
    *rules.GENERATION_LIMITS_NEED_TEXT_GENERATION, rules.GENERATIVE_METRIC_NEEDS_TEXT_GENERATION,
    rules.ENGINE_VLLM_NEEDS_TRANSFORMERS_GENERATION, rules.TENSOR_PARALLEL_WITHIN_GPUS,
    *rules.ROUTING_RULES, *rules.ADAPTER_RULES, *rules.COMPILE_RULES,
]
if rules.GPU_ONLY_QUANTIZATIONS:
    _SPEC_RULES.append(rules.QUANTIZATION_ON_CPU)


class ModelServiceSpec(ApiModel):
    """The desired state of a served model."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(*_SPEC_RULES))

    model: ModelSource = Field(description="Where the model is and how to load it.")
    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = Field(
        default=1,
        description=(
            "Pods in total over all variants, split by weight (largest remainder, at least one "
            "per variant with weight > 0 when the total allows). The /scale subresource's "
            "path: an HPA or KEDA owns it when autoscaling is set."
        ),
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="Compute for each pod.",
        json_schema_extra={"default": Resources().to_wire()},
    )
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Where the pods may run.")
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec,
        description="The serving runtime.",
        json_schema_extra={"default": RuntimeSpec().to_wire()},
    )
    variants: Annotated[list[Variant], Field(min_length=1, max_length=MAX_VARIANTS)] = Field(
        default_factory=_default_variants,
        description=(
            "Quantization variants, keyed by name, each its own Deployment; weights sum to 100. "
            "Default: one variant named default with quantization none."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [rules.WEIGHTS_SUM_TO_100.to_schema()],
            "default": [{"name": "default", "quantization": "none", "weight": 100}],
        },
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Scale spec.replicas with load (HPA or KEDA)."
    )
    rollout: Rollout = Field(
        default_factory=Rollout,
        description="How a spec change reaches the pods.",
        # Whole objects, not {}: the API server checks a default against the CEL rules as it is.
        json_schema_extra={"default": Rollout().to_wire()},
    )
    gateway: GatewayRef | None = Field(
        default=None, description="Attach an HTTPRoute with exact per-variant weights to this Gateway."
    )
    # a one-value Literal's schema is `const`, which a CRD schema lacks: an enum instead
    routing: Annotated[Routing, WithJsonSchema({"type": "string", "enum": ["inferencePool"]})] | None = Field(
        default=None,
        description=(
            "inferencePool: route through the Gateway API Inference Extension, an InferencePool over "
            "the pods and its endpoint picker (<name>-epp) as the HTTPRoute's backend, instead of "
            "per-variant weights. Needs spec.gateway and a text-generation model. Unset: off."
        ),
    )
    adapters: Annotated[list[Adapter], Field(max_length=MAX_ADAPTERS)] | None = Field(
        default=None,
        description=(
            "LoRA adapters of a text-generation model, each served as its own model name. Adding or "
            "removing one reaches the running pods without a restart (a ConfigMap the runtime "
            "watches); setting the field at all (even []) adds the adapter machinery to the pods once."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    network: NetworkAccess = Field(
        default_factory=NetworkAccess,
        description="Who may connect to the model's pods (the operator's NetworkPolicy).",
        json_schema_extra={"default": NetworkAccess().to_wire()},
    )

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, adapters: list[Adapter] | None) -> list[Adapter] | None:
        seen: set[str] = set()
        for index, adapter in enumerate(adapters or ()):
            if adapter.name in seen:
                raise PydanticCustomError(
                    rules.CROSS_FIELD_ERROR,
                    "{message}",
                    {"message": f'Duplicate value: adapter name "{adapter.name}"', "field_path": f"[{index}]"},
                )
            seen.add(adapter.name)
        return adapters

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, variants: list[Variant]) -> list[Variant]:
        seen: set[str] = set()
        for index, variant in enumerate(variants):
            if variant.name in seen:
                raise PydanticCustomError(
                    rules.CROSS_FIELD_ERROR,
                    "{message}",
                    {"message": f'Duplicate value: variant name "{variant.name}"', "field_path": f"[{index}]"},
                )
            seen.add(variant.name)
        if sum(variant.weight for variant in variants) != 100:
            raise rules.violation(rules.WEIGHTS_SUM_TO_100)
        return variants

    @model_validator(mode="after")
    def _check_rules(self) -> ModelServiceSpec:
        device = "gpu" if self.resources.gpu.count > 0 else "cpu"
        if any(device not in QUANTIZATION_DEVICES[v.quantization] for v in self.variants):
            raise rules.violation(rules.QUANTIZATION_ON_GPU if device == "gpu" else rules.QUANTIZATION_ON_CPU)
        if self.autoscaling and self.autoscaling.metric == "cpu" and self.resources.cpu is None:
            raise rules.violation(rules.CPU_METRIC_NEEDS_CPU_REQUEST)
        if (self.autoscaling and self.autoscaling.scales_to_zero and self.gateway is None
                and self.autoscaling.activation_query is None):
            raise rules.violation(rules.SCALE_TO_ZERO_NEEDS_DEMAND_SIGNAL)
        if self.routing is not None:
            self._check_routing()
        if self.adapters:
            if not self.model.generative:
                raise rules.violation(rules.ADAPTERS_NEED_TEXT_GENERATION)
            if any(v.quantization not in ADAPTER_QUANTIZATIONS for v in self.variants):
                raise rules.violation(rules.ADAPTERS_NEED_FLOAT_WEIGHTS)
            if self.resources.gpu.nodes > 1:
                raise rules.violation(rules.ADAPTERS_ON_ONE_NODE)
        if not self.model.generative:
            runtime = self.runtime
            limits = (runtime.max_model_len, runtime.max_num_seqs, runtime.kv_cache_tokens)
            for rule, value in zip(rules.GENERATION_LIMITS_NEED_TEXT_GENERATION, limits, strict=True):
                if value is not None:
                    raise rules.violation(rule)
            if self.autoscaling and self.autoscaling.metric in GENERATIVE_METRICS:
                raise rules.violation(rules.GENERATIVE_METRIC_NEEDS_TEXT_GENERATION)
        wants_vllm = self.runtime.engine == "vllm" or any(v.engine == "vllm" for v in self.variants)
        if wants_vllm and not (self.model.format == "transformers" and self.model.task == "text-generation"):
            raise rules.violation(rules.ENGINE_VLLM_NEEDS_TRANSFORMERS_GENERATION)
        split = self.runtime.tensor_parallel_size
        if split is not None and (self.resources.gpu.count == 0 or self.resources.gpu.count % split):
            raise rules.violation(rules.TENSOR_PARALLEL_WITHIN_GPUS)
        compiling = [v for v in self.variants if self.compile_of(v) == "decode"]
        if compiling:
            self._check_compile(compiling)
        return self

    def _check_compile(self, compiling: list[Variant]) -> None:
        if not self.model.generative:
            raise rules.violation(rules.COMPILE_NEEDS_TEXT_GENERATION)
        if any(self.resolved_engine(v) != "builtin" for v in compiling):
            raise rules.violation(rules.COMPILE_NEEDS_BUILTIN_ENGINE)
        if self.adapters is not None:
            raise rules.violation(rules.COMPILE_NOT_WITH_ADAPTERS)

    def engine_of(self, variant: Variant) -> Engine:
        """The engine a variant asks for: its own, else runtime.engine (auto, builtin or vllm)."""
        return variant.engine or self.runtime.engine

    def resolved_engine(self, variant: Variant) -> Literal["builtin", "vllm"]:
        """builtin or vllm: the variant's engine with auto decided (vllm for a transformers
        text-generation model with GPUs, builtin otherwise; docs/api.md, Engines)."""
        asked = self.engine_of(variant)
        if asked != "auto":
            return asked
        model = self.model
        if model.format == "transformers" and model.task == "text-generation" and self.uses_gpu:
            return "vllm"
        return "builtin"

    def compile_of(self, variant: Variant) -> CompileMode:
        """The compiled decode a variant asks for: its own, else runtime.compile (off or decode)."""
        return variant.compile or self.runtime.compile

    def _check_routing(self) -> None:
        for rule, holds in ((rules.ROUTING_NEEDS_TEXT_GENERATION, self.model.generative),
                            (rules.ROUTING_NEEDS_GATEWAY, self.gateway is not None),
                            (rules.ROUTING_NOT_WITH_CANARY, self.rollout.strategy != "Canary"),
                            (rules.ROUTING_KEEPS_PICKER_NAME,
                             all(v.name != PICKER_SUFFIX for v in self.variants))):
            if not holds:
                raise rules.violation(rule)

    @property
    def uses_gpu(self) -> bool:
        return self.resources.gpu.count > 0
