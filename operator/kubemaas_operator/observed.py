"""What the operator observed of its children, as the planners and the status read it: the
Deployments (`ObservedDeployment`, whether one has rolled out) and the groups of a variant over
several nodes (`ObservedGroup`, from their RayClusters and pods). `rollout.py`, `multinode.py`
and `observe.py` all import it; none of them imports another for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kubemaas_operator.builders.naming import VARIANT_LABEL
from kubemaas_operator.builders.raycluster import GROUP_NAME_LABEL
from kubemaas_operator.builders.revision import REVISION_LABEL, TRACK_LABEL


@dataclass(frozen=True)
class ObservedDeployment:
    """A Deployment of the ModelService as the watch last saw it."""

    name: str
    variant: str
    revision: str | None = None  # None: made before revisions were labelled
    track: str | None = None
    replicas: int = 0  # spec.replicas
    available: int = 0
    rolled_out: bool = False  # every pod updated to its template and available

    @classmethod
    def from_object(cls, obj: dict) -> ObservedDeployment | None:
        meta = obj.get("metadata", {})
        labels = meta.get("labels") or {}
        if VARIANT_LABEL not in labels:
            return None
        return cls(name=meta["name"], variant=labels[VARIANT_LABEL], revision=labels.get(REVISION_LABEL),
                   track=labels.get(TRACK_LABEL), replicas=(obj.get("spec") or {}).get("replicas", 1),
                   available=(obj.get("status") or {}).get("availableReplicas", 0),
                   rolled_out=deployment_rolled_out(obj))


def deployment_rolled_out(dep: dict, applied_generation: int = 0) -> bool:
    """Whether the Deployment controller reports every pod updated to the current template and
    available; a copy older than our last apply (a watch event in flight) is not."""
    spec_replicas = dep.get("spec", {}).get("replicas", 1)
    st = dep.get("status", {})
    generation = dep["metadata"].get("generation", 0)
    return (
        generation >= applied_generation
        and st.get("observedGeneration", 0) >= generation
        and st.get("updatedReplicas", 0) >= spec_replicas
        and st.get("replicas", 0) == spec_replicas
        and st.get("availableReplicas", 0) >= spec_replicas
    )


@dataclass(frozen=True)
class ObservedGroup:
    """One RayCluster of a ModelService as observed: from its labels and its pods."""

    name: str
    variant: str
    revision: str
    pods: int = 0
    ready_pods: int = 0

    def ready(self, nodes: int) -> bool:
        return self.ready_pods >= nodes


def _pod_ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def observed_groups(clusters: Iterable[dict], pods: Iterable[dict]) -> tuple[ObservedGroup, ...]:
    """Groups by name: every RayCluster listed, and every group whose pods are seen (status,
    which follows pods, may see a group's pods without its RayCluster)."""
    counts: dict[str, list[int]] = {}
    labels_of: dict[str, dict] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        name = labels.get(GROUP_NAME_LABEL)
        if not name:
            continue
        seen = counts.setdefault(name, [0, 0])
        seen[0] += 1
        seen[1] += _pod_ready(pod)
        labels_of.setdefault(name, labels)
    for cluster in clusters:
        labels = (cluster.get("metadata") or {}).get("labels") or {}
        labels_of[cluster["metadata"]["name"]] = labels
    out = []
    for name, labels in sorted(labels_of.items()):
        pods_seen, ready = counts.get(name, [0, 0])
        out.append(ObservedGroup(name, labels.get(VARIANT_LABEL, ""), labels.get(REVISION_LABEL, ""),
                                 pods_seen, ready))
    return tuple(out)
