"""The operator's settings, read once from the environment at startup.

Every variable is prefixed `KUBEMAAS_OPERATOR_` so it never collides with the runtime's own
`KUBEMAAS_*` configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "KUBEMAAS_OPERATOR_"
# comma-separated lists in the environment
LIST_SETTINGS = ("namespaces", "allowed_runtime_images", "trusted_code_sources")
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
DEFAULT_RUNTIME_IMAGE = "ghcr.io/kubemaas/kubemaas-runtime:0.1.0"
DEFAULT_VLLM_RUNTIME_IMAGE = "ghcr.io/kubemaas/kubemaas-runtime-vllm:0.1.0"
# Envoy Gateway names the upstream cluster of each HTTPRoute rule httproute/<ns>/<route>/rule/<n>.
# upstream_rq_completed, unlike upstream_rq_total, also counts the 503s Envoy answers itself
# while the route has no endpoint, which is exactly the demand that must wake a model at zero.
DEFAULT_GATEWAY_REQUEST_QUERY = (
    "sum(rate(envoy_cluster_upstream_rq_completed"
    '{envoy_cluster_name=~"httproute/{namespace}/{route}/rule/.*"}[1m]))'
)


class OperatorSettings(BaseModel):
    """What the operator is configured with; the builders read only this, never the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime_image: Annotated[str, Field(min_length=1)] = Field(
        default=DEFAULT_RUNTIME_IMAGE,
        description=(
            "Runtime image of the builtin engine's flavour, for a variant whose engine resolves to "
            "builtin and whose ModelService names no image and has none pinned in status."
        ),
    )
    runtime_image_vllm: Annotated[str, Field(min_length=1)] = Field(
        default=DEFAULT_VLLM_RUNTIME_IMAGE,
        description="Runtime image of the vLLM flavour, for a variant whose engine resolves to vllm (the same policy).",
    )
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource of a GPU.")
    gpu_product_label: str = Field(
        default="nvidia.com/gpu.product", description="Node label naming the GPU model (GPU feature discovery)."
    )
    gpu_memory_label: str = Field(
        default="nvidia.com/gpu.memory",
        description="Node label with the memory of one GPU in MiB (GPU feature discovery): the GPU-fit check.",
    )
    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch; empty: the whole cluster."
    )
    log_format: Literal["text", "json"] = "text"
    cluster_domain: str = Field(default="cluster.local", description="DNS domain of Services, for status.url.")
    field_manager: str = Field(default="kubemaas-operator", description="Server-side apply field manager.")
    prometheus_address: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus the KEDA prometheus triggers query (engine keda, metric concurrency/rps).",
    )
    gateway_request_query: str = Field(
        default=DEFAULT_GATEWAY_REQUEST_QUERY,
        description=(
            "PromQL for the request rate the Gateway sees for one ModelService's HTTPRoute: what wakes "
            "a model at zero replicas (engine keda, minReplicas 0, spec.gateway, no activationQuery). "
            "{namespace}, {name} (the ModelService) and {route} (its HTTPRoute) are filled in; other "
            "braces are PromQL's. The default reads Envoy Gateway's proxy metrics."
        ),
    )
    startup_timeout_seconds: Annotated[int, Field(ge=30)] = Field(
        default=1800, description="How long a model may take to load before its pod is restarted."
    )
    drain_seconds: Annotated[int, Field(ge=0)] = Field(
        default=30,
        description=(
            "How long a stopping pod may take to finish in-flight requests: the runtime's --drain-seconds "
            "(KUBEMAAS_DRAIN_SECONDS), and with the preStop pause and a margin the pod's grace period."
        ),
    )
    # -- limits and lock-down (docs/install.md, "Locking endpoints down") ---------------------
    runtime_memory_limit: Annotated[str, Field(pattern=QUANTITY)] = Field(
        default="4Gi",
        description="Memory limit (and request) of a runtime container whose spec.resources.memory is empty.",
    )
    tmp_size_limit: Annotated[str, Field(pattern=QUANTITY)] = Field(
        default="1Gi", description="sizeLimit of the runtime's writable /tmp emptyDir."
    )
    model_volume_size_limit: Annotated[str, Field(pattern=QUANTITY)] = Field(
        default="50Gi",
        description="sizeLimit of the emptyDir an s3:// or hf:// model is fetched into; the fetch stops past it.",
    )
    model_cache: bool = Field(
        default=False,
        description=("The switch for spec.model.cache node: render each such ModelService's local "
                     "PersistentVolume and claim over model_cache_path. Off: such a ModelService is "
                     "refused (ModelCacheDisabled); the chart's modelCache.enabled sets it and grants "
                     "RBAC on persistentvolumes and persistentvolumeclaims."),
    )
    model_cache_path: Annotated[str, Field(pattern=r"^/[^\n]*$")] = Field(
        default="/var/lib/kubemaas/model-cache",
        description=(
            "Folder on every node of the cache's node group that holds the node-local model cache "
            "(spec.model.cache node), writable by uid/gid 65532; the local PersistentVolumes point at it."
        ),
    )
    model_cache_node_label: str = Field(
        default="kubemaas.io/model-cache",
        description=(
            "Node label (value \"true\") of the node group that has model_cache_path: the local "
            "PersistentVolumes' required node affinity, so cached pods run only there."
        ),
    )
    model_cache_capacity: Annotated[str, Field(pattern=QUANTITY)] = Field(
        default="500Gi", description="Capacity the node-local cache's PersistentVolumes and claims declare."
    )
    model_cache_eviction_namespace: str = Field(
        default="",
        description=(
            "Namespace (the operator's own; the chart sets it with modelCache.enabled) of the Jobs "
            "that remove a node-cache entry no ModelService refers to any more, one per node of the "
            "node group, and of their claim on the cache folder. Empty: entries are never evicted."
        ),
    )
    model_cache_sweep_seconds: Annotated[int, Field(ge=30)] = Field(
        default=600,
        description=(
            "How often (and once at start) the operator sweeps for node-cache entries no "
            "ModelService refers to whose last reference went while it was stopped (a ModelService "
            "deleted meanwhile leaves its PersistentVolume Released), and runs their eviction Jobs; "
            "also the back-off before an eviction Job that failed on a node is written again."
        ),
    )
    fetch_timeout_seconds: Annotated[int, Field(ge=60)] = Field(
        default=3600, description="Longest a model fetch (the init container) may take."
    )
    allowed_runtime_images: tuple[str, ...] = Field(
        default=(),
        description=(
            "Runtime images a ModelService may run (fnmatch patterns, e.g. "
            "'registry.example/kubemaas-runtime:*'); empty: any tag or digest of the default "
            "runtime image's repository. Another image is refused (Ready=False, ImageNotAllowed)."
        ),
    )
    trusted_code_sources: tuple[str, ...] = Field(
        default=("pvc://", "file://", "s3://"),
        description=(
            "URI prefixes torchscript and exported-program models (which are programs the runtime "
            "runs) may come from; others are refused (UntrustedModelSource)."
        ),
    )
    network_policy: bool = Field(
        default=True, description="Create a NetworkPolicy per ModelService admitting only the namespaces that need it."
    )
    metrics_namespace: str = Field(
        default="monitoring", description="Namespace of the metrics scraper (Prometheus), admitted by the NetworkPolicy."
    )
    workers: Annotated[int, Field(ge=1)] = Field(default=16, description="kopf's thread pool for sync handlers (the Kubernetes client blocks).")
    health_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080, description="Port of the liveness endpoint /healthz; 0 disables it."
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9090, description="Port of the operator's Prometheus /metrics; 0 disables it."
    )
    endpoint_picker_image: str = Field(
        default="",
        description=("The switch for spec.routing: inferencePool: the image of the endpoint picker "
                     "(the Gateway API Inference Extension's, built from its module) run per routed "
                     "ModelService. Empty: off, and such a ModelService is Ready=False, "
                     "InferenceRoutingDisabled (the chart's inferenceRouting.enabled sets it and "
                     "grants what it needs)."),
    )
    multi_node: bool = Field(
        default=False,
        description=("The switch for resources.gpu.nodes > 1: render each replica of such a variant "
                     "as a KubeRay RayCluster (ray.io/v1). Off: such a variant is refused "
                     "(MultiNodeNotSupported); on without the KubeRay CRDs: MultiNodeControllerMissing "
                     "(the chart's multiNode.enabled sets it and grants RBAC on rayclusters)."),
    )
    verbose: bool = Field(default=False, description="Debug logging.")

    @field_validator("gateway_request_query")
    @classmethod
    def _check_gateway_request_query(cls, query: str) -> str:
        # A query that names no model would wake every model behind the Gateway at once.
        if "{namespace}" not in query or ("{name}" not in query and "{route}" not in query):
            raise ValueError("must contain {namespace} and {name} or {route}, to select one model's requests")
        return query

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorSettings:
        """Settings from `KUBEMAAS_OPERATOR_*` variables; unset ones keep their defaults.

        KUBEMAAS_OPERATOR_NAMESPACES, _ALLOWED_RUNTIME_IMAGES and _TRUSTED_CODE_SOURCES are
        comma-separated lists.
        """
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            if name in LIST_SETTINGS:
                values[name] = tuple(ns.strip() for ns in raw.split(",") if ns.strip())
            else:
                values[name] = raw
        return cls.model_validate(values)
