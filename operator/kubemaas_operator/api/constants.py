"""Names and limits of the `kubemaas.io/v1alpha1` API, in one place.

The length limits exist because children are named from the ModelService's name and its
variants' names, and a Service name (and a label value) may have at most 63 characters:
`<name>-<variant>` is at most 42 + 1 + 20 = 63.
"""

from __future__ import annotations

from typing import Final, Literal

GROUP: Final = "kubemaas.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "kubemaas.io/v1alpha1"  # GROUP/VERSION, spelled out: a literal type
KIND: Final = "ModelService"
PLURAL: Final = "modelservices"
SINGULAR: Final = "modelservice"
SHORT_NAMES: Final = ("msvc",)
CATEGORIES: Final = ("all", "kubemaas")
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

MAX_NAME_LENGTH: Final = 42
MAX_VARIANT_NAME_LENGTH: Final = 20
# A revision is named by this many hex digits of a hash of what shapes its pods; with a canary
# through a gateway, Services `<name>-<variant>-<revision>` must fit in 63 characters.
REVISION_LENGTH: Final = 6
MAX_CANARY_NAME_LENGTH: Final = 63 - 2 - REVISION_LENGTH
MAX_VARIANTS: Final = 8
MAX_ADAPTERS: Final = 8  # spec.adapters; also the runtime's --max-loras (a fixed pod template)
ADAPTER_SCHEMES: Final = ("file", "s3", "hf")  # pvc:// would need a volume per claim
ADAPTER_QUANTIZATIONS: Final = ("none", "fp16", "bf16")  # peft and vLLM's LoRA need float weights
MAX_REPLICAS: Final = 1000
MAX_GPUS_PER_POD: Final = 16
MAX_GPU_NODES: Final = 64  # nodes one replica may span (resources.gpu.nodes)
MAX_URI_LENGTH: Final = 1024
MAX_ROLLOUT_STEPS: Final = 10
MAX_PROMQL_LENGTH: Final = 1024
MAX_TOLERATIONS: Final = 32
MAX_NODE_SELECTOR_ENTRIES: Final = 32

# DNS-1035 label: what a Service name must be (starts with a letter).
DNS_LABEL_PATTERN: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# A Kubernetes resource quantity without a sign ("2", "500m", "8Gi", "1e3").
QUANTITY_PATTERN: Final = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
PERCENT_PATTERN: Final = r"^[0-9]{1,3}%$"
# A model's size: a plain count of parameters, or a count with K, M, B or T ("135M", "7B", "1.5B").
PARAMETER_COUNT_PATTERN: Final = r"^([1-9][0-9]{0,14}|[0-9]{1,6}(\.[0-9]{1,3})?[KMBT])$"
MAX_PARAMETER_COUNT: Final = 10**15
MAX_GENERATION_TOKENS: Final = 16 * 1024 * 1024  # bounds maxModelLen and kvCacheTokens

ModelFormat = Literal["torchscript", "exported-program", "safetensors", "transformers", "gguf"]
ModelTask = Literal["feature-extraction", "text-classification", "text-generation"]
# Formats that take spec.model.task (gguf files are causal LMs: text-generation only).
TASKED_FORMATS: Final = ("transformers", "gguf")
Quantization = Literal[
    "none", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "int4-weight-only"
]
# The runtime's engines (its --engine): auto lets the operator pick (docs/api.md, "Engines").
Engine = Literal["auto", "builtin", "vllm"]
# The builtin engine's compiled decode (the runtime's --compile): off, or decode compiled at start.
CompileMode = Literal["off", "decode"]
AutoscalingEngine = Literal["hpa", "keda"]
AutoscalingMetric = Literal[
    "cpu", "concurrency", "rps", "running-sequences", "waiting-sequences", "kv-cache-usage"
]
# Metrics only a text-generation runtime exports.
GENERATIVE_METRICS: Final = ("running-sequences", "waiting-sequences", "kv-cache-usage")
RolloutStrategy = Literal["RollingUpdate", "Canary"]
Routing = Literal["inferencePool"]
ModelCacheMode = Literal["none", "node"]
# The endpoint picker's children are <name>-epp, so no variant may take that name with routing on.
PICKER_SUFFIX: Final = "epp"

# Which quantization runs on which device. The API server refuses the pairs missing here;
# the runtime publishes the same matrix (docs/api.md).
QUANTIZATION_DEVICES: Final[dict[str, frozenset[str]]] = {
    "none": frozenset({"cpu", "gpu"}),
    "fp16": frozenset({"cpu", "gpu"}),
    "bf16": frozenset({"cpu", "gpu"}),
    "int8-dynamic": frozenset({"cpu"}),
    "int8-weight-only": frozenset({"cpu", "gpu"}),
    "int4-weight-only": frozenset({"cpu", "gpu"}),
}

# URI schemes the operator implements, and the shape each must have.
URI_SCHEMES: Final = ("pvc", "file", "s3", "hf")
URI_SHAPE_PATTERN: Final = (
    r"^(pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^/].*)?"
    r"|file:///.+"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
    r"|hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9_][-A-Za-z0-9_.]*)*(@[-A-Za-z0-9_./]+)?)$"
)
