"""`ModelService.status`: written only by the operator; strict schema, no kopf bookkeeping.

kopf keeps its own progress and diff-base in annotations (docs/api.md, "kopf's storage").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from kubemaas_operator.api.base import ApiModel
from kubemaas_operator.api.constants import MAX_ADAPTERS, MAX_VARIANTS, Quantization


class Condition(ApiModel):
    """A condition in the standard Kubernetes shape."""

    model_config = ConfigDict(extra="ignore")

    type: Annotated[str, StringConstraints(min_length=1, max_length=316)] = Field(
        description="Ready, Progressing or Degraded."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    ] = Field(description="Why, in CamelCase (e.g. GPUMemoryInsufficient, EngineCannotShard, NameConflict).")
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        default="", description="What happened and what to do, for a person."
    )
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="The metadata.generation this condition was computed for."
    )


class GroupStatus(ApiModel):
    """One group of a variant over several nodes (resources.gpu.nodes > 1): one RayCluster."""

    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, StringConstraints(max_length=63)] = Field(description="The RayCluster.")
    revision: Annotated[str, StringConstraints(max_length=16)] = Field(description="The revision it runs.")
    nodes: Annotated[int, Field(ge=0)] = Field(default=0, description="Its pods: one head, nodes-1 workers.")
    ready_nodes: Annotated[int, Field(ge=0)] = Field(default=0, description="Its pods that are ready.")
    ready: bool = Field(default=False, description="Every pod of the group is ready: it serves.")


class VariantStatus(ApiModel):
    """What one variant is serving."""

    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, StringConstraints(max_length=63)] = Field(description="Variant name.")
    quantization: Quantization = Field(description="Its quantization.")
    weight: Annotated[int, Field(ge=0, le=100)] = Field(description="Its weight in the spec.")
    replicas: Annotated[int, Field(ge=0)] = Field(default=0, description="Pods desired for it.")
    ready_replicas: Annotated[int, Field(ge=0)] = Field(default=0, description="Its pods that are ready.")
    traffic_share: Annotated[float, Field(ge=0, le=100)] = Field(
        default=0,
        description=(
            "Percent of requests it receives: its weight through a Gateway, otherwise its share "
            "of the ready pods behind the Service."
        ),
    )
    revision: Annotated[str, StringConstraints(max_length=16)] | None = Field(
        default=None, description="The stable revision it serves (a hash of what shapes its pods)."
    )
    deployment: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None, description="The Deployment of the stable revision."
    )
    canary_revision: Annotated[str, StringConstraints(max_length=16)] | None = Field(
        default=None, description="During a canary: the new revision."
    )
    canary_deployment: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        default=None, description="During a canary: the new revision's Deployment."
    )
    canary_replicas: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="During a canary: pods desired for the new revision at this step."
    )
    canary_ready_replicas: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="During a canary: the new revision's ready pods."
    )
    canary_traffic_share: Annotated[float, Field(ge=0, le=100)] | None = Field(
        default=None, description="During a canary: percent of all requests the new revision receives."
    )
    groups: Annotated[list[GroupStatus], Field(max_length=256)] | None = Field(
        default=None,
        description=("resources.gpu.nodes > 1: its groups (RayClusters), one per replica, with "
                     "their revision and readiness; replicas and readyReplicas count groups. "
                     "After gpu.nodes is lowered to 1: the groups still serving until the "
                     "variant's Deployment is ready, then deleted."),
    )
    gpu_memory_mib: Annotated[int, Field(ge=0)] | None = Field(
        default=None, alias="gpuMemoryMiB",
        description="GPU fit (model.parameterCount with GPUs): the estimated memory one pod needs per GPU, in MiB.",
    )
    gpu_memory_estimate: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="GPU fit: the estimate and its parts (weights, KV cache, overhead), in GiB."
    )
    gpu_fit: Literal["Fits", "Insufficient", "Unknown"] | None = Field(
        default=None,
        description=(
            "GPU fit: Fits (some node's GPUs hold it; its pods require such GPUs), Insufficient "
            "(none does: it gets no pods, Ready=False GPUMemoryInsufficient) or Unknown (no node seen)."
        ),
    )


MAX_CACHE_NODES = 256  # status.cache entries (nodes by name; the summary counts those listed)


class NodeCacheStatus(ApiModel):
    """The node-local model cache (model.cache node) on one node, from the fetch step's report."""

    model_config = ConfigDict(extra="ignore")

    node: Annotated[str, StringConstraints(max_length=253)] = Field(description="The node.")
    key: Annotated[str, StringConstraints(max_length=63)] = Field(
        description="The cache entry (a hash of the model URI with its revision).")
    revision: Annotated[str, StringConstraints(max_length=256)] = Field(
        default="", description="The revision the entry holds (hf:// @revision; empty for s3://).")
    bytes: Annotated[int, Field(ge=0)] = Field(default=0, description="Size of the entry's files.")
    ready: bool = Field(
        default=False,
        description="A pod on this node found the entry complete or filled it (its fetch step reported so).")
    pods: Annotated[int, Field(ge=0)] = Field(
        default=0, description="This ModelService's pods on the node that use the entry.")
    last_result: Literal["Hit", "Filled"] | None = Field(
        default=None, description="The latest report: Hit (found complete, nothing fetched) or Filled (fetched).")
    last_result_time: datetime | None = Field(
        default=None, description="When the fetch step that made the latest report finished.")


RolloutPhase = Literal["Complete", "Progressing", "Held", "Refused"]


class RolloutStatus(ApiModel):
    """Where the last spec change is on its way to the pods."""

    model_config = ConfigDict(extra="ignore")

    strategy: Literal["RollingUpdate", "Canary"] = Field(description="The strategy in effect.")
    phase: RolloutPhase = Field(
        description=(
            "Complete (every variant runs the spec), Progressing (pods rolling, a canary step "
            "scaling or pausing, or the previous revision being retired) or Held (a canary step "
            "waiting for the spec to advance it) or Refused (a variant the operator gives no pods: "
            "GPUMemoryInsufficient, EngineCannotShard or MultiNodeNotSupported, in message)."
        )
    )
    stable_revision: Annotated[str, StringConstraints(max_length=16)] | None = Field(
        default=None, description="The revision serving (over all variants)."
    )
    canary_revision: Annotated[str, StringConstraints(max_length=16)] | None = Field(
        default=None, description="During a canary: the revision being rolled out (over all variants)."
    )
    step: Annotated[int, Field(ge=0, le=64)] | None = Field(
        default=None,
        description="During a canary: the step in progress, from 1; steps + 1 is the promotion.",
    )
    steps: Annotated[int, Field(ge=0, le=64)] | None = Field(
        default=None, description="During a canary: how many steps it has."
    )
    canary_weight: Annotated[int, Field(ge=0, le=100)] | None = Field(
        default=None,
        description=(
            "During a canary: percent of each changed variant's traffic routed to the new "
            "revision now (exact through a Gateway; otherwise approximated by pod counts)."
        ),
    )
    step_started_at: datetime | None = Field(
        default=None, description="When the current step's weight took effect."
    )
    message: Annotated[str, StringConstraints(max_length=4096)] = Field(
        default="", description="What the rollout is doing or waiting for."
    )


class ModelServiceStatus(ApiModel):
    """The observed state, written by the operator."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="The metadata.generation the operator last acted on."
    )
    replicas: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Pods in total over all variants (the /scale status)."
    )
    ready_replicas: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Ready pods in total."
    )
    selector: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Label selector of all the pods (for /scale and the HPA)."
    )
    url: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="In-cluster URL of the model's v2 endpoint."
    )
    runtime_image: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None,
        description=(
            "Runtime image of the builtin engine's flavour, which variants with engine builtin run; "
            "changes only with spec.runtime.image (or the FollowOperator policy)."
        ),
    )
    vllm_runtime_image: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None,
        description=(
            "Runtime image of the vLLM flavour, which variants with engine vllm run; pinned like "
            "runtimeImage."
        ),
    )
    variant_summary: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Ready/desired pods per variant, e.g. \"bf16 2/2, int8 1/1\"."
    )
    gpu_memory: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None,
        description="GPU fit per variant, e.g. \"int4 ~45GiB/GPU, bf16 ~143GiB/GPU (no fit)\" (kubectl get -o wide).",
    )
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    variants: Annotated[list[VariantStatus], Field(max_length=MAX_VARIANTS * 2)] = Field(
        default_factory=list,
        description="Per-variant replicas, readiness, revisions and traffic share.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    rollout: RolloutStatus | None = Field(
        default=None, description="The rollout of the current spec: strategy, phase, canary step and weight."
    )
    cache: Annotated[list[NodeCacheStatus], Field(max_length=MAX_CACHE_NODES)] | None = Field(
        default=None,
        description=("model.cache node: the cache entry on each node where this ModelService's pods "
                     "run (bytes, revision, ready), from their fetch steps' reports."),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["node"]},
    )
    cache_summary: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description="model.cache node: nodes with the entry ready / nodes with pods, e.g. \"1/2 nodes\".")
    adapters: Annotated[list[Annotated[str, StringConstraints(max_length=63)]], Field(max_length=MAX_ADAPTERS)] | None = (
        Field(default=None, description=(
            "The LoRA adapters the pods are told to serve (spec.adapters' names, written to the ConfigMap "
            "<name>-adapters, which the runtime follows without a restart).")))


def format_variant_summary(variants: Sequence[VariantStatus]) -> str:
    """The printer column text: `bf16 2/2, int8 1/1` (ready/desired per variant); during a
    canary `bf16 3/2 (canary 1/1)`: the ready count includes the canary's pods."""
    def one(v: VariantStatus) -> str:
        text = f"{v.name} {v.ready_replicas}/{v.replicas}"
        if v.canary_deployment:
            text += f" (canary {v.canary_ready_replicas or 0}/{v.canary_replicas or 0})"
        return text

    return ", ".join(one(v) for v in variants)
