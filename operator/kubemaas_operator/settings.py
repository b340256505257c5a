"""The operator's settings, read once from the environment at startup (CONVENTIONS item 9).

Every variable is prefixed `KUBEMAAS_OPERATOR_` so it never collides with the runtime's own
`KUBEMAAS_*` configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "KUBEMAAS_OPERATOR_"
DEFAULT_RUNTIME_IMAGE = "ghcr.io/kubemaas/kubemaas-runtime:0.1.0"


class OperatorSettings(BaseModel):
    """What the operator is configured with; the builders read only this, never the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime_image: Annotated[str, Field(min_length=1)] = Field(
        default=DEFAULT_RUNTIME_IMAGE,
        description="Runtime image for a ModelService that names none and has none pinned in status.",
    )
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource of a GPU.")
    gpu_product_label: str = Field(
        default="nvidia.com/gpu.product", description="Node label naming the GPU model (GPU feature discovery)."
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
    startup_timeout_seconds: Annotated[int, Field(ge=30)] = Field(
        default=1800, description="How long a model may take to load before its pod is restarted."
    )
    drain_seconds: Annotated[int, Field(ge=0)] = Field(
        default=30, description="How long a stopping pod may take to finish in-flight requests."
    )
    workers: Annotated[int, Field(ge=1)] = Field(default=16, description="kopf's thread pool for sync handlers (the Kubernetes client blocks).")
    health_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080, description="Port of the liveness endpoint /healthz; 0 disables it."
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9090, description="Port of the operator's Prometheus /metrics; 0 disables it."
    )
    verbose: bool = Field(default=False, description="Debug logging.")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorSettings:
        """Settings from `KUBEMAAS_OPERATOR_*` variables; unset ones keep their defaults.

        KUBEMAAS_OPERATOR_NAMESPACES is a comma-separated list.
        """
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            if name == "namespaces":
                values[name] = tuple(ns.strip() for ns in raw.split(",") if ns.strip())
            else:
                values[name] = raw
        return cls.model_validate(values)
