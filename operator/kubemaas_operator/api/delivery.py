"""`spec.autoscaling` and `spec.rollout`: who moves `spec.replicas`, and how a change reaches
the pods. Their cross-field rules are `CelRule`s (see `rules.py`), checked here too."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from kubemaas_operator.api import rules
from kubemaas_operator.api.base import ApiModel, IntOrPercent
from kubemaas_operator.api.constants import (
    MAX_PROMQL_LENGTH,
    MAX_REPLICAS,
    MAX_ROLLOUT_STEPS,
    AutoscalingEngine,
    AutoscalingMetric,
    RolloutStrategy,
)


class Autoscaling(ApiModel):
    """An HPA (engine hpa) or KEDA ScaledObject (engine keda) that owns spec.replicas via /scale."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(
        rules.MIN_NOT_ABOVE_MAX, rules.SCALE_TO_ZERO_NEEDS_KEDA, rules.SCALE_TO_ZERO_NEEDS_REQUEST_METRIC,
        rules.ACTIVATION_QUERY_ONLY_AT_ZERO, rules.KV_CACHE_USAGE_IS_A_PERCENT,
    ))

    engine: AutoscalingEngine = Field(default="hpa", description="hpa or keda.")
    min_replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = Field(
        default=1,
        description=(
            "Fewest replicas in total; 0 (scale to zero) needs engine keda, a request metric and a "
            "demand signal that exists while no pod runs (spec.gateway or activationQuery)."
        ),
    )
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = Field(
        description="Most replicas in total."
    )
    metric: AutoscalingMetric = Field(
        default="concurrency",
        description=(
            "cpu (utilization of resources.cpu), concurrency (in-flight requests per pod, "
            "kubemaas_inflight_requests), rps (requests per second per pod), or for "
            "text-generation running-sequences (kubemaas_num_requests_running), "
            "waiting-sequences (kubemaas_num_requests_waiting) or kv-cache-usage "
            "(kubemaas_kv_cache_usage_ratio, target in percent)."
        ),
    )
    target: Annotated[int, Field(ge=1, le=100000)] = Field(
        description=(
            "Target per pod: percent of the CPU request, in-flight requests, requests per second, "
            "sequences running or waiting, or percent of the KV-cache budget in use."
        )
    )
    scale_down_stabilization_seconds: Annotated[int, Field(ge=0, le=3600)] | None = Field(
        default=None,
        description=(
            "How long load must stay low before scaling down (default 300); with minReplicas 0 also "
            "how long the model must be idle before KEDA stops the last pod."
        ),
    )
    activation_query: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_PROMQL_LENGTH)
    ] | None = Field(
        default=None,
        description=(
            "For scale to zero (engine keda, minReplicas 0): a PromQL query that returns the model's "
            "demand even while no pod runs, such as the request rate a gateway or ingress sees for it "
            "(the runtime's own metrics have no series then). Above 0, KEDA starts the first pod. "
            "Unset, with spec.gateway: the Gateway's request rate for the model's HTTPRoute."
        ),
    )

    @model_validator(mode="after")
    def _check_rules(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise rules.violation(rules.MIN_NOT_ABOVE_MAX)
        if self.min_replicas == 0 and self.engine != "keda":
            raise rules.violation(rules.SCALE_TO_ZERO_NEEDS_KEDA)
        if self.min_replicas == 0 and self.metric == "cpu":
            raise rules.violation(rules.SCALE_TO_ZERO_NEEDS_REQUEST_METRIC)
        if self.activation_query is not None and not (self.engine == "keda" and self.min_replicas == 0):
            raise rules.violation(rules.ACTIVATION_QUERY_ONLY_AT_ZERO)
        if self.metric == "kv-cache-usage" and self.target > 100:
            raise rules.violation(rules.KV_CACHE_USAGE_IS_A_PERCENT)
        return self

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0


class CanaryStep(ApiModel):
    """One step of a canary rollout: a share of traffic on the new revision, then a pause."""

    weight: Annotated[int, Field(ge=1, le=99)] = Field(
        description="Percent of each changed variant's traffic on the new revision during this step."
    )
    pause_seconds: Annotated[int, Field(ge=0, le=86400)] | None = Field(
        default=None,
        description=(
            "How long to hold this step once the new revision's pods for it are available, "
            "then go on. Unset: hold until the spec advances it (give this step a pauseSeconds, "
            "or remove it)."
        ),
    )

    @property
    def held(self) -> bool:
        return self.pause_seconds is None


class Rollout(ApiModel):
    """How a spec change reaches the pods."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(rules.ROLLOUT_CAN_PROGRESS, rules.STEPS_ONLY_FOR_CANARY))

    strategy: RolloutStrategy = Field(
        default="RollingUpdate",
        description=(
            "RollingUpdate (each changed variant's Deployment rolls in place, surge first) or "
            "Canary (a second Deployment per changed variant takes the steps' share of traffic "
            "while the previous revision keeps serving, then becomes the stable one)."
        ),
    )
    max_surge: IntOrPercent = Field(
        default=1,
        description=(
            "Extra pods during a rolling update. The default, 1 with maxUnavailable 0, starts "
            "each new pod before an old one stops, so capacity never dips while a model loads."
        ),
    )
    max_unavailable: IntOrPercent = Field(
        default=0,
        description=(
            "Pods that may be unavailable during a rolling update; above 0 lets a rollout "
            "replace pods in place when no node has room (for example no free GPU) for a surge pod."
        ),
    )
    steps: Annotated[list[CanaryStep], Field(max_length=MAX_ROLLOUT_STEPS)] = Field(
        default_factory=list,
        description=(
            "Canary traffic steps (strategy Canary only), in order; after the last one the new "
            "revision takes all traffic and becomes stable. Empty with Canary: one step of 10% "
            "held until the spec advances it."
        ),
    )

    @model_validator(mode="after")
    def _check_rules(self) -> Rollout:
        if str(self.max_surge) in ("0", "0%") and str(self.max_unavailable) in ("0", "0%"):
            raise rules.violation(rules.ROLLOUT_CAN_PROGRESS)
        if self.strategy != "Canary" and self.steps:
            raise rules.violation(rules.STEPS_ONLY_FOR_CANARY)
        return self

    @property
    def canary_steps(self) -> tuple[CanaryStep, ...]:
        """The steps a canary walks (the documented default when the spec lists none)."""
        return tuple(self.steps) or (CanaryStep(weight=10),)
