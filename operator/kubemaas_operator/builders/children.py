"""Every child a ModelService should have, in one pure function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.autoscaling import build_autoscaler
from kubemaas_operator.builders.deployment import build_variant_deployment
from kubemaas_operator.builders.disruption import build_disruption_budget, wants_disruption_budget
from kubemaas_operator.builders.gateway import build_http_route
from kubemaas_operator.builders.replicas import replicas_by_variant
from kubemaas_operator.builders.services import build_model_service, build_variant_service
from kubemaas_operator.settings import OperatorSettings


@dataclass(frozen=True)
class ChildKind:
    """A kind the operator may create; `crd` names the CRD it needs when not built in."""

    api_version: str
    kind: str
    plural: str
    crd: str | None = None


CHILD_KINDS: tuple[ChildKind, ...] = (
    ChildKind("apps/v1", "Deployment", "deployments"),
    ChildKind("v1", "Service", "services"),
    ChildKind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ChildKind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    ChildKind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects", crd="scaledobjects.keda.sh"),
    ChildKind(
        "gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes", crd="httproutes.gateway.networking.k8s.io"
    ),
)


def resolve_runtime_image(ms: ModelService, settings: OperatorSettings) -> str:
    """The image when the caller pins none: spec.runtime.image, else status.runtimeImage, else
    the operator's default. (The operator decides the pin itself and passes `runtime_image`.)"""
    if ms.spec.runtime.image:
        return ms.spec.runtime.image
    if ms.status is not None and ms.status.runtime_image:
        return ms.status.runtime_image
    return settings.runtime_image


def build_children(
    ms: ModelService, settings: OperatorSettings, runtime_image: str | None = None
) -> list[dict[str, Any]]:
    """The desired children, in apply order: Deployments, Services, PDB, autoscaler, HTTPRoute.

    Pure: a function of the spec, the settings and the runtime image alone. `ms` must have a
    namespace; its uid becomes the owner reference (a placeholder when it has none yet).
    """
    image = runtime_image or resolve_runtime_image(ms, settings)
    split = replicas_by_variant(ms.spec.replicas, ms.spec.variants)
    children: list[dict[str, Any]] = [
        build_variant_deployment(ms, variant, split[variant.name], settings, image) for variant in ms.spec.variants
    ]
    children.append(build_model_service(ms))
    children.extend(build_variant_service(ms, variant) for variant in ms.spec.variants)
    if wants_disruption_budget(ms):
        children.append(build_disruption_budget(ms))
    optional = (build_autoscaler(ms, settings), build_http_route(ms))
    children.extend(child for child in optional if child is not None)
    return children
