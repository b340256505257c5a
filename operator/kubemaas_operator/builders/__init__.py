"""Pure builders: (ModelService, OperatorSettings, runtime image) -> desired children as dicts."""

from kubemaas_operator.builders.autoscaling import (
    REQUEST_METRICS,
    build_autoscaler,
    build_hpa,
    build_scaled_object,
)
from kubemaas_operator.builders.children import build_children
from kubemaas_operator.builders.deployment import build_variant_deployment
from kubemaas_operator.builders.disruption import build_disruption_budget, wants_disruption_budget
from kubemaas_operator.builders.gateway import build_http_route
from kubemaas_operator.builders.image import (
    FOLLOW_OPERATOR,
    IMAGE_POLICY_ANNOTATION,
    PinnedImages,
    RuntimeImages,
    choose_runtime_image,
    choose_runtime_images,
    operator_images,
    pinned_images,
)
from kubemaas_operator.builders.layout import Track, VariantLayout, steady_layouts
from kubemaas_operator.builders.naming import (
    MODELSERVICE_LABEL,
    VARIANT_LABEL,
    owner_reference,
    selector_string,
    service_url,
    variant_child_name,
)
from kubemaas_operator.builders.replicas import replicas_by_variant
from kubemaas_operator.builders.revision import REVISION_LABEL, TRACK_LABEL, variant_revisions
from kubemaas_operator.builders.services import build_model_service, build_variant_service

__all__ = [
    "FOLLOW_OPERATOR",
    "IMAGE_POLICY_ANNOTATION",
    "MODELSERVICE_LABEL",
    "REQUEST_METRICS",
    "REVISION_LABEL",
    "TRACK_LABEL",
    "VARIANT_LABEL",
    "PinnedImages",
    "RuntimeImages",
    "Track",
    "VariantLayout",
    "build_autoscaler",
    "build_children",
    "build_disruption_budget",
    "build_hpa",
    "build_http_route",
    "build_model_service",
    "build_scaled_object",
    "build_variant_deployment",
    "build_variant_service",
    "choose_runtime_image",
    "choose_runtime_images",
    "operator_images",
    "owner_reference",
    "pinned_images",
    "replicas_by_variant",
    "selector_string",
    "service_url",
    "steady_layouts",
    "variant_child_name",
    "variant_revisions",
    "wants_disruption_budget",
]
