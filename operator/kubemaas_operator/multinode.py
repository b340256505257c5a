"""Groups: a variant over several nodes runs each replica as one RayCluster (builders/raycluster).

Pure planning, level-based, from what is observed (the RayClusters and their pods):

- ``spec.replicas`` (the variant's share) is the number of groups; ``/scale`` adds or removes
  whole groups, highest index first.
- A new revision rolls surge-first by whole groups: at most ``maxSurge`` (resolved against the
  variant's groups, at least one) new groups beyond those already ready exist at a time, and a
  group of an earlier revision is deleted only once a new one is ready in its place. The plan is
  recomputed from the pods at each step (the rollout timer), never from memory.
- Readiness comes from the pods (every pod of a group Ready: head and nodes-1 workers), not from
  the RayCluster's ``status.state``, which is KubeRay's and differs by version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kubemaas_operator.api import ModelService, Variant
from kubemaas_operator.builders.raycluster import group_name
from kubemaas_operator.observed import ObservedGroup
from kubemaas_operator.settings import OperatorSettings

CONTROLLER_MISSING_REASON = "MultiNodeControllerMissing"
CONTROLLER_MISSING_MESSAGE = (
    "resources.gpu.nodes above 1 runs each replica as a KubeRay RayCluster, but the cluster has "
    "no rayclusters.ray.io CRD: install KubeRay (ray-operator v1.5, its CRDs and controller) or "
    "use gpu.nodes 1. No pod was created for it.")


def is_multi_node(ms: ModelService, settings: OperatorSettings) -> bool:
    """Its variants run as groups (RayClusters), not Deployments."""
    return settings.multi_node and ms.spec.resources.gpu.nodes > 1


@dataclass(frozen=True)
class GroupPlan:
    """The groups of one variant now: ``apply`` (at the current revision) and ``keep`` (earlier
    revisions, still serving until new groups are ready in their place)."""

    apply: tuple[str, ...]
    keep: tuple[str, ...] = ()


def surge_groups(max_surge: int | str, groups: int) -> int:
    """maxSurge in whole groups (a percentage of the variant's groups, rounded up), at least 1."""
    text = str(max_surge)
    if text.endswith("%"):
        return max(1, math.ceil(groups * int(text[:-1]) / 100))
    return max(1, int(text))


def plan_groups(ms: ModelService, variant: Variant, replicas: int, revision: str,
                observed: Sequence[ObservedGroup]) -> GroupPlan:
    nodes = ms.spec.resources.gpu.nodes
    names = [group_name(ms.name, variant.name, revision, i) for i in range(replicas)]
    mine = [g for g in observed if g.variant == variant.name]
    current = {g.name: g for g in mine if g.revision == revision}
    earlier = sorted((g for g in mine if g.revision != revision),
                     key=lambda g: (not g.ready(nodes), g.name))
    if not earlier:  # a new variant, a scale: every group at once
        return GroupPlan(tuple(names))
    ready_new = sum(1 for n in names if n in current and current[n].ready(nodes))
    wanted = min(replicas, ready_new + surge_groups(ms.spec.rollout.max_surge, replicas))
    apply = tuple(n for i, n in enumerate(names) if i < wanted or n in current)
    keep = tuple(g.name for g in earlier[:max(0, replicas - ready_new)])
    return GroupPlan(apply, keep)
