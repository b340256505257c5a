"""The cross-field rules of the API, each written once for both enforcers.

Every rule is a CEL expression the API server evaluates (`x-kubernetes-validations` in the
generated CRD) and a message; the pydantic validators in `spec.py` implement the same check
in Python and raise :func:`violation` with the same message and field path, so `render` and
`kubectl apply` refuse the same specs with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError

from kubemaas_operator.api.constants import (
    ADAPTER_QUANTIZATIONS,
    ADAPTER_SCHEMES,
    DNS_LABEL_PATTERN,
    GENERATIVE_METRICS,
    MAX_CANARY_NAME_LENGTH,
    MAX_NAME_LENGTH,
    PICKER_SUFFIX,
    QUANTIZATION_DEVICES,
    REVISION_LENGTH,
    TASKED_FORMATS,
    URI_SCHEMES,
    URI_SHAPE_PATTERN,
)

CROSS_FIELD_ERROR = "cross_field_rule"


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry: rule, message, and the field it is reported on."""

    rule: str
    message: str
    field_path: str | None = None  # relative to the object the rule sits on, e.g. ".minReplicas"
    reason: str = "FieldValueInvalid"  # or FieldValueRequired/Forbidden/Duplicate (the API server's list)

    def to_schema(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        entry["reason"] = self.reason
        return entry


def violation(rule: CelRule) -> PydanticCustomError:
    """The pydantic error for a broken rule; `api.errors` appends `field_path` to the location."""
    return PydanticCustomError(
        CROSS_FIELD_ERROR, "{message}", {"message": rule.message, "field_path": rule.field_path or ""}
    )


def schema_rules(*rules: CelRule) -> dict[str, Any]:
    """`json_schema_extra` for a model carrying these rules."""
    return {"x-kubernetes-validations": [rule.to_schema() for rule in rules]}


def _cel_list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


CPU_ONLY_QUANTIZATIONS = sorted(q for q, devices in QUANTIZATION_DEVICES.items() if "gpu" not in devices)
GPU_ONLY_QUANTIZATIONS = sorted(q for q, devices in QUANTIZATION_DEVICES.items() if "cpu" not in devices)

# --- on the ModelService (root): the name the children are named after -------------------
NAME_LENGTH = CelRule(
    rule=f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    message=(
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters: children are named "
        "<name>-<variant> and a Service name may have at most 63"
    ),
    field_path=".metadata.name",
    reason="FieldValueInvalid",
)
NAME_FORMAT = CelRule(
    rule=f"self.metadata.name.matches('{DNS_LABEL_PATTERN}')",
    message=(
        "metadata.name must be a DNS label (lowercase letters, digits and '-', starting with "
        "a letter): it names the model's Service"
    ),
    field_path=".metadata.name",
)
CANARY_SERVICE_NAME_LENGTH = CelRule(
    rule=(
        "!has(self.spec.gateway) || !has(self.spec.rollout) || self.spec.rollout.strategy != 'Canary' || "
        f"self.spec.variants.all(v, size(self.metadata.name) + size(v.name) <= {MAX_CANARY_NAME_LENGTH})"
    ),
    message=(
        f"metadata.name and each variant name may have at most {MAX_CANARY_NAME_LENGTH} characters "
        "together with rollout.strategy Canary and a gateway: the HTTPRoute's per-revision Services "
        f"are named <name>-<variant>-<revision> ({REVISION_LENGTH} characters) and a Service name "
        "may have at most 63"
    ),
    field_path=".metadata.name",
)

# --- on spec.model ----------------------------------------------------------------------
URI_SCHEME = CelRule(
    rule="self.uri.matches('^(" + "|".join(URI_SCHEMES) + ")://')",
    message="model.uri: unimplemented scheme; use pvc://, file://, s3:// or hf://",
    field_path=".uri",
)
URI_SHAPE = CelRule(
    rule="!self.uri.matches('^(" + "|".join(URI_SCHEMES) + f")://') || self.uri.matches('{URI_SHAPE_PATTERN}')",
    message=(
        "model.uri must look like pvc://<claim>[/<path>], file:///<absolute path>, "
        "s3://<bucket>[/<key>] or hf://<org>/<name>[/<file>][@<revision>]"
    ),
    field_path=".uri",
)
# hf://org/name/file.gguf: one file of the repo. A path in an hf:// URI names a GGUF file only.
_HF_WITH_PATH = "^hf://[^/@]+/[^/@]+/"
HF_GGUF_NAMES_A_FILE = CelRule(
    rule=(
        "self.format != 'gguf' || !self.uri.startsWith('hf://') || "
        "self.uri.matches('^hf://[^/@]+/[^/@]+/[^@]+[.]gguf(@.*)?$')"
    ),
    message=(
        "model.uri: with model.format gguf an hf:// URI names one file of the repo: "
        "hf://<org>/<name>/<file>.gguf[@<revision>]"
    ),
    field_path=".uri",
)
HF_PATH_ONLY_FOR_GGUF = CelRule(
    rule=f"self.format == 'gguf' || !self.uri.matches('{_HF_WITH_PATH}')",
    message="model.uri: a file path in an hf:// URI applies only to model.format gguf; name the repo, hf://<org>/<name>",
    field_path=".uri",
)
CACHE_ONLY_FOR_DOWNLOADS = CelRule(
    rule="!has(self.cache) || self.cache == 'none' || self.uri.startsWith('s3://') || self.uri.startsWith('hf://')",
    message=(
        "model.cache node applies only to downloaded models (s3:// or hf://): pvc:// and file:// "
        "models are already local to the pod"
    ),
    field_path=".cache",
)
ARCHITECTURE_FOR_SAFETENSORS = CelRule(
    rule="self.format != 'safetensors' || has(self.architecture)",
    message="model.architecture (pkg.module:factory) is required when model.format is safetensors",
    field_path=".architecture",
    reason="FieldValueRequired",
)
TASK_FOR_TRANSFORMERS = CelRule(
    rule="self.format != 'transformers' || has(self.task)",
    message=(
        "model.task (feature-extraction, text-classification or text-generation) is required "
        "when model.format is transformers"
    ),
    field_path=".task",
    reason="FieldValueRequired",
)
TASK_ONLY_FOR_TRANSFORMERS = CelRule(
    rule=f"!has(self.task) || self.format in {_cel_list(list(TASKED_FORMATS))}",
    message="model.task applies only to model.format transformers or gguf",
    field_path=".task",
)
GGUF_IS_TEXT_GENERATION = CelRule(
    rule="self.format != 'gguf' || !has(self.task) || self.task == 'text-generation'",
    message="model.format gguf serves only model.task text-generation (a GGUF file is a causal LM)",
    field_path=".task",
)

# --- on spec.resources.gpu --------------------------------------------------------------
GPU_PRODUCT_NEEDS_COUNT = CelRule(
    rule="!has(self.product) || self.count > 0",
    message="resources.gpu.product names a GPU model but resources.gpu.count is 0; set a count or remove the product",
    field_path=".product",
)

GPU_NODES_NEED_COUNT = CelRule(
    rule="!has(self.nodes) || self.nodes == 1 || self.count > 0",
    message="resources.gpu.nodes above 1 spans GPU nodes, but resources.gpu.count is 0; set a count per node",
    field_path=".nodes",
)

# --- on spec.variants -------------------------------------------------------------------
WEIGHTS_SUM_TO_100 = CelRule(
    rule="self.map(v, v.weight).sum() == 100",
    message="variants: the weights must sum to 100",
)

# --- on spec.autoscaling ----------------------------------------------------------------
MIN_NOT_ABOVE_MAX = CelRule(
    rule="self.minReplicas <= self.maxReplicas",
    message="autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas",
    field_path=".minReplicas",
)
SCALE_TO_ZERO_NEEDS_KEDA = CelRule(
    rule="self.minReplicas > 0 || self.engine == 'keda'",
    message="autoscaling.minReplicas 0 (scale to zero) needs autoscaling.engine keda",
    field_path=".minReplicas",
)
SCALE_TO_ZERO_NEEDS_REQUEST_METRIC = CelRule(
    rule="self.minReplicas > 0 || self.metric != 'cpu'",
    message="autoscaling.minReplicas 0 (scale to zero) needs a request metric (concurrency or rps), not cpu",
    field_path=".minReplicas",
)
ACTIVATION_QUERY_ONLY_AT_ZERO = CelRule(
    rule="!has(self.activationQuery) || (self.engine == 'keda' && self.minReplicas == 0)",
    message="autoscaling.activationQuery applies only to scale to zero (autoscaling.engine keda, minReplicas 0)",
    field_path=".activationQuery",
)

KV_CACHE_USAGE_IS_A_PERCENT = CelRule(
    rule="self.metric != 'kv-cache-usage' || self.target <= 100",
    message="autoscaling.target is a percent (1-100) of the KV-cache budget with metric kv-cache-usage",
    field_path=".target",
)

# --- on spec.runtime --------------------------------------------------------------------
KV_CACHE_HOLDS_ONE_SEQUENCE = CelRule(
    rule="!has(self.kvCacheTokens) || !has(self.maxModelLen) || self.kvCacheTokens >= self.maxModelLen",
    message=(
        "runtime.kvCacheTokens must be at least runtime.maxModelLen: a sequence of the longest "
        "context must fit in the KV-cache budget"
    ),
    field_path=".kvCacheTokens",
)

# --- on spec.rollout --------------------------------------------------------------------
ROLLOUT_CAN_PROGRESS = CelRule(
    rule="!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])",
    message="rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
    field_path=".maxSurge",
)
STEPS_ONLY_FOR_CANARY = CelRule(
    rule="self.strategy == 'Canary' || !has(self.steps) || size(self.steps) == 0",
    message="rollout.steps applies only to rollout.strategy Canary",
    field_path=".steps",
)

# --- on spec (rules that span its fields) -----------------------------------------------
QUANTIZATION_ON_GPU = CelRule(
    rule=(
        "self.resources.gpu.count == 0 || "
        f"self.variants.all(v, !(v.quantization in {_cel_list(CPU_ONLY_QUANTIZATIONS)}))"
    ),
    message=(
        "variants: quantization "
        + ", ".join(CPU_ONLY_QUANTIZATIONS)
        + " runs only on CPU; use resources.gpu.count 0 or another quantization"
    ),
    field_path=".variants",
)
QUANTIZATION_ON_CPU = CelRule(
    rule=(
        "self.resources.gpu.count > 0 || "
        f"self.variants.all(v, !(v.quantization in {_cel_list(GPU_ONLY_QUANTIZATIONS)}))"
    ),
    message=(
        "variants: quantization " + ", ".join(GPU_ONLY_QUANTIZATIONS or ["(none)"])
        + " needs a GPU; set resources.gpu.count"
    ),
    field_path=".variants",
)
CPU_METRIC_NEEDS_CPU_REQUEST = CelRule(
    rule="!has(self.autoscaling) || self.autoscaling.metric != 'cpu' || has(self.resources.cpu)",
    message="autoscaling.metric cpu needs resources.cpu: utilization is measured against the request",
    field_path=".autoscaling.metric",
)
# On spec, not autoscaling: the demand signal may be the Gateway. With no pod there is no
# runtime series, so without one of these KEDA would never start the first pod again.
SCALE_TO_ZERO_NEEDS_DEMAND_SIGNAL = CelRule(
    rule=(
        "!has(self.autoscaling) || self.autoscaling.minReplicas > 0 || has(self.gateway) || "
        "has(self.autoscaling.activationQuery)"
    ),
    message=(
        "autoscaling.minReplicas 0 (scale to zero) needs a demand signal that exists while no pod "
        "runs: set spec.gateway (its request rate wakes the model) or autoscaling.activationQuery"
    ),
    field_path=".autoscaling.minReplicas",
)

# The vLLM engine loads a Hugging Face model directory and serves text generation. One rule for
# the ModelService's engine and every variant's (a variant's engine overrides the spec's).
_VLLM_SOMEWHERE = (
    "((has(self.runtime) && has(self.runtime.engine) && self.runtime.engine == 'vllm') || "
    "self.variants.exists(v, has(v.engine) && v.engine == 'vllm'))"
)
ENGINE_VLLM_NEEDS_TRANSFORMERS_GENERATION = CelRule(
    rule=(
        f"!{_VLLM_SOMEWHERE} || (self.model.format == 'transformers' && "
        "has(self.model.task) && self.model.task == 'text-generation')"
    ),
    message=(
        "runtime.engine (or a variant's engine) vllm serves only model.format transformers with "
        "model.task text-generation (vLLM loads a Hugging Face model directory, not GGUF or a "
        "torch archive): use engine builtin or auto"
    ),
    field_path=".runtime.engine",
)
TENSOR_PARALLEL_WITHIN_GPUS = CelRule(
    rule=(
        "!has(self.runtime) || !has(self.runtime.tensorParallelSize) || "
        "(self.resources.gpu.count > 0 && self.resources.gpu.count % self.runtime.tensorParallelSize == 0)"
    ),
    message=(
        "runtime.tensorParallelSize is how many of a pod's GPUs one copy of the model is split "
        "over: it needs resources.gpu.count and must divide it (default: resources.gpu.count)"
    ),
    field_path=".runtime.tensorParallelSize",
)

# Generative-only fields on a model that does not generate text.
_GENERATES = "(self.model.format == 'gguf' || (has(self.model.task) && self.model.task == 'text-generation'))"


# spec.runtime.compile decode (or a variant's compile): the builtin engine compiles its
# text-generation decode step at start. Each rule looks at every variant's own value, else the
# runtime's, as `ModelServiceSpec.compile_of` and `engine_of` do.
def _of_variant(field: str, default: str) -> str:
    return (f"(has(v.{field}) ? v.{field} : (has(self.runtime) && has(self.runtime.{field}) ? "
            f"self.runtime.{field} : '{default}'))")


_COMPILES = f"{_of_variant('compile', 'off')} == 'decode'"
_NONE_COMPILES = f"self.variants.all(v, !({_COMPILES}))"
# auto takes vllm for a transformers text-generation model with GPUs (engine.py)
_AUTO_TAKES_VLLM = ("(self.model.format == 'transformers' && has(self.model.task) && "
                    "self.model.task == 'text-generation' && self.resources.gpu.count > 0)")
COMPILE_NEEDS_TEXT_GENERATION = CelRule(
    rule=f"{_GENERATES} || {_NONE_COMPILES}",
    message=(
        "runtime.compile (or a variant's compile) decode compiles the decode step of text "
        "generation: it applies only to model.task text-generation (or model.format gguf)"
    ),
    field_path=".runtime.compile",
)
COMPILE_NEEDS_BUILTIN_ENGINE = CelRule(
    rule=(
        f"self.variants.all(v, !({_COMPILES}) || {_of_variant('engine', 'auto')} == 'builtin' || "
        f"({_of_variant('engine', 'auto')} == 'auto' && !{_AUTO_TAKES_VLLM}))"
    ),
    message=(
        "runtime.compile (or a variant's compile) decode is the builtin engine's compiled decode: "
        "a variant whose engine is vllm, or auto taking vllm (a transformers text-generation model "
        "with GPUs), cannot use it (vLLM compiles its own); set that variant's engine builtin or its compile off"
    ),
    field_path=".runtime.compile",
)
# The runtime turns compiled decode off whenever LoRA is on (--max-loras, which spec.adapters
# sets even when empty): adapter steps change the modules per step. Refused, not silently eager.
COMPILE_NOT_WITH_ADAPTERS = CelRule(
    rule=f"!has(self.adapters) || {_NONE_COMPILES}",
    message=(
        "runtime.compile (or a variant's compile) decode does not run with LoRA adapters (the "
        "runtime decodes eager whenever spec.adapters is set): remove spec.adapters or set compile off"
    ),
    field_path=".runtime.compile",
)
COMPILE_RULES = (COMPILE_NEEDS_TEXT_GENERATION, COMPILE_NEEDS_BUILTIN_ENGINE, COMPILE_NOT_WITH_ADAPTERS)


def _generation_limit_rule(field: str) -> CelRule:
    return CelRule(
        rule=f"!has(self.runtime) || !has(self.runtime.{field}) || {_GENERATES}",
        message=(
            f"runtime.{field} is a generation limit: it applies only to model.task text-generation "
            "(or model.format gguf)"
        ),
        field_path=f".runtime.{field}",
    )


MAX_MODEL_LEN_NEEDS_TEXT_GENERATION = _generation_limit_rule("maxModelLen")
MAX_NUM_SEQS_NEEDS_TEXT_GENERATION = _generation_limit_rule("maxNumSeqs")
KV_CACHE_TOKENS_NEEDS_TEXT_GENERATION = _generation_limit_rule("kvCacheTokens")
GENERATION_LIMITS_NEED_TEXT_GENERATION = (
    MAX_MODEL_LEN_NEEDS_TEXT_GENERATION, MAX_NUM_SEQS_NEEDS_TEXT_GENERATION, KV_CACHE_TOKENS_NEEDS_TEXT_GENERATION,
)
GENERATIVE_METRIC_NEEDS_TEXT_GENERATION = CelRule(
    rule=(
        f"!has(self.autoscaling) || !(self.autoscaling.metric in {_cel_list(list(GENERATIVE_METRICS))}) || "
        + _GENERATES
    ),
    message=(
        "autoscaling.metric " + ", ".join(GENERATIVE_METRICS) + " are exported only by a "
        "text-generation runtime: use model.task text-generation, or concurrency, rps or cpu"
    ),
    field_path=".autoscaling.metric",
)

# spec.routing: inferencePool (Gateway API Inference Extension): the pool's HTTPRoute needs a
# Gateway, the picker routes OpenAI requests, and it picks among all the pods (no weights).
ROUTING_NEEDS_TEXT_GENERATION = CelRule(
    rule="!has(self.routing) || " + _GENERATES,
    message=("routing inferencePool routes OpenAI generation requests by queue and KV cache: it "
             "needs model.task text-generation (or model.format gguf)"),
    field_path=".routing",
)
ROUTING_NEEDS_GATEWAY = CelRule(
    rule="!has(self.routing) || has(self.gateway)",
    message="routing inferencePool attaches the pool's HTTPRoute to a Gateway: set spec.gateway",
    field_path=".routing",
)
ROUTING_NOT_WITH_CANARY = CelRule(
    rule="!has(self.routing) || self.rollout.strategy != 'Canary'",
    message=("routing inferencePool lets the endpoint picker choose among all the pods, so a "
             "Canary's traffic steps cannot hold: use rollout.strategy RollingUpdate"),
    field_path=".routing",
)
ROUTING_KEEPS_PICKER_NAME = CelRule(
    rule=f"!has(self.routing) || self.variants.all(v, v.name != '{PICKER_SUFFIX}')",
    message=(f"routing inferencePool names the endpoint picker <name>-{PICKER_SUFFIX}: rename the "
             f"variant {PICKER_SUFFIX}"),
    field_path=".variants",
)
ROUTING_RULES = (ROUTING_NEEDS_TEXT_GENERATION, ROUTING_NEEDS_GATEWAY, ROUTING_NOT_WITH_CANARY,
                 ROUTING_KEEPS_PICKER_NAME)

# spec.adapters (LoRA): each adapter is a model name beside the base model's, fetched beside it.
ADAPTER_URI_SCHEME = CelRule(
    rule="self.uri.matches('^(" + "|".join(ADAPTER_SCHEMES) + ")://') && self.uri.matches('"
         + URI_SHAPE_PATTERN + "')",
    message=("adapters[].uri must be s3://<bucket>[/<key>], hf://<org>/<name>@<revision> or "
             "file:///<absolute path> (pvc:// is not implemented for adapters)"),
    field_path=".uri",
)
ADAPTERS_NEED_TEXT_GENERATION = CelRule(
    rule="!has(self.adapters) || size(self.adapters) == 0 || " + _GENERATES,
    message="adapters are LoRA adapters of a generative model: they need model.task text-generation",
    field_path=".adapters",
)
ADAPTERS_NEED_FLOAT_WEIGHTS = CelRule(
    rule=("!has(self.adapters) || size(self.adapters) == 0 || self.variants.all(v, v.quantization in "
          + _cel_list(list(ADAPTER_QUANTIZATIONS)) + ")"),
    message=("adapters apply LoRA to float weights: every variant's quantization must be one of "
             + ", ".join(ADAPTER_QUANTIZATIONS)),
    field_path=".adapters",
)
# A model over several nodes (a RayCluster): the head's engine loads an adapter while the other
# nodes' copies of it may still be fetching, and vLLM's LoRA under Ray pipeline parallel has not
# run here; refused until both are built and tested.
ADAPTERS_ON_ONE_NODE = CelRule(
    rule=("!has(self.adapters) || size(self.adapters) == 0 || !has(self.resources.gpu.nodes) || "
          "self.resources.gpu.nodes == 1"),
    message=("adapters are served by models on one node: with resources.gpu.nodes above 1 remove "
             "spec.adapters (or serve the adapter's merged weights as their own ModelService)"),
    field_path=".adapters",
)
ADAPTER_RULES = (ADAPTERS_NEED_TEXT_GENERATION, ADAPTERS_NEED_FLOAT_WEIGHTS, ADAPTERS_ON_ONE_NODE)
# on the root: the served name of the base model is metadata.name
ADAPTER_NOT_THE_MODEL_NAME = CelRule(
    rule="!has(self.spec.adapters) || self.spec.adapters.all(a, a.name != self.metadata.name)",
    message="spec.adapters[].name must differ from metadata.name, the base model's served name",
    field_path=".spec.adapters",
)

ROOT_RULES = (NAME_LENGTH, NAME_FORMAT, CANARY_SERVICE_NAME_LENGTH, ADAPTER_NOT_THE_MODEL_NAME)
