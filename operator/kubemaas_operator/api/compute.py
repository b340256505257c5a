"""Compute and placement of a ModelService's pods: `spec.resources` and `spec.scheduling`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from kubemaas_operator.api import rules
from kubemaas_operator.api.base import ApiModel, FreeFormObject, LabelKey, LabelValue, Quantity
from kubemaas_operator.api.constants import (
    MAX_GPU_NODES,
    MAX_GPUS_PER_POD,
    MAX_NODE_SELECTOR_ENTRIES,
    MAX_TOLERATIONS,
)


class GpuResources(ApiModel):
    """GPUs per pod."""

    model_config = ConfigDict(json_schema_extra=rules.schema_rules(
        rules.GPU_PRODUCT_NEEDS_COUNT, rules.GPU_NODES_NEED_COUNT))

    count: Annotated[int, Field(ge=0, le=MAX_GPUS_PER_POD)] = Field(
        default=0, description="GPUs per pod (the nvidia.com/gpu limit); 0 runs on CPU only."
    )
    nodes: Annotated[int, Field(ge=1, le=MAX_GPU_NODES)] = Field(
        default=1,
        description=(
            "Nodes one replica spans, each with `count` GPUs: the GPU-fit check divides the model "
            "over count x nodes GPUs. Above 1 each replica is a KubeRay RayCluster (a group: a "
            "head running vLLM with tensor parallel count and pipeline parallel nodes, and "
            "nodes-1 workers); where the operator's multiNode switch is off the variant is "
            "refused (MultiNodeNotSupported), where KubeRay is not installed "
            "MultiNodeControllerMissing (docs/operator.md, Multi-node)."
        ),
    )
    product: LabelValue | None = Field(
        default=None,
        description=(
            "Only schedule on nodes whose nvidia.com/gpu.product label (set by NVIDIA GPU "
            "feature discovery) has this value, e.g. NVIDIA-H100-80GB-HBM3."
        ),
    )

    @model_validator(mode="after")
    def _check_rules(self) -> GpuResources:
        if self.product is not None and self.count == 0:
            raise rules.violation(rules.GPU_PRODUCT_NEEDS_COUNT)
        if self.nodes > 1 and self.count == 0:
            raise rules.violation(rules.GPU_NODES_NEED_COUNT)
        return self


class Resources(ApiModel):
    """Compute for each pod."""

    gpu: GpuResources = Field(
        default_factory=GpuResources,
        description="GPUs per pod.",
        json_schema_extra={"default": GpuResources().to_wire()},
    )
    cpu: Quantity | None = Field(
        default=None, description="CPU request per pod (e.g. \"2\", \"500m\"); no limit is set."
    )
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit per pod (e.g. 8Gi)."
    )


class Toleration(ApiModel):
    """A Kubernetes toleration, as in a pod spec."""

    key: LabelKey | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: LabelValue | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class Scheduling(ApiModel):
    """Where the pods may run, merged into each Deployment's pod spec."""

    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_NODE_SELECTOR_ENTRIES)] = Field(
        default_factory=dict,
        description="Node labels the pods require (resources.gpu.product adds nvidia.com/gpu.product).",
    )
    tolerations: Annotated[list[Toleration], Field(max_length=MAX_TOLERATIONS)] = Field(
        default_factory=list,
        description="Taints the pods tolerate (with GPUs, the nvidia.com/gpu NoSchedule taint is added).",
    )
    affinity: FreeFormObject | None = Field(
        default=None, description="A pod affinity object (nodeAffinity, podAffinity, podAntiAffinity)."
    )
    priority_class_name: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None, description="PriorityClass of the pods."
    )
    runtime_class_name: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None, description="RuntimeClass of the pods (e.g. nvidia)."
    )
