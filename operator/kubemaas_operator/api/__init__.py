"""The `kubemaas.io/v1alpha1` API: pydantic models that are the source of the CRD."""

from kubemaas_operator.api.compute import GpuResources, Resources, Scheduling, Toleration
from kubemaas_operator.api.constants import API_VERSION, GROUP, KIND, PLURAL, VERSION
from kubemaas_operator.api.delivery import Autoscaling, CanaryStep, Rollout
from kubemaas_operator.api.errors import describe_errors, field_path
from kubemaas_operator.api.resource import ModelService, ObjectMeta
from kubemaas_operator.api.spec import (
    Adapter,
    GatewayRef,
    ModelServiceSpec,
    ModelSource,
    RuntimeSpec,
    SecretReference,
    Variant,
)
from kubemaas_operator.api.status import (
    Condition,
    GroupStatus,
    ModelServiceStatus,
    NodeCacheStatus,
    VariantStatus,
    format_variant_summary,
)

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "Adapter",
    "Autoscaling", "CanaryStep", "Condition", "GatewayRef", "GpuResources", "GroupStatus", "ModelService",
    "ModelServiceSpec", "ModelServiceStatus", "ModelSource", "NodeCacheStatus", "ObjectMeta", "Resources", "Rollout",
    "RuntimeSpec", "Scheduling", "SecretReference", "Toleration", "Variant", "VariantStatus",
    "describe_errors", "field_path", "format_variant_summary",
]
