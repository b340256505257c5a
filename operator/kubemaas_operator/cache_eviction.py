"""Evict a node-cache entry once no ModelService refers to its key: decide (pure), then run.

An entry `<key>` is referred to while, anywhere in the cluster,
- a ModelService with `model.cache: node` uses it: its PersistentVolume (cluster-scoped, one per
  such ModelService, labelled with the key; the label follows a URI change) exists, not being
  deleted and not Released (a claim deleted before this operator deleted PVs), or
- a pod labelled with the key is still there (an earlier revision rolling out, or the pods of a
  deleted ModelService while the garbage collector removes them).

The PVs are read with one LIST by label, so ModelServices in namespaces this operator does not
watch count too; pods are read from the operator's own pod index. The check runs when a cached
pod is deleted (the last pod of a key going is when an entry can become unused) and when a
ModelService with the cache is deleted (its PV is deleted then: it has no owner to be collected
with). Unreferenced: the Jobs of builders/cache_eviction.py, one per node of the node group, each
told the decision's time so a pod that hit or filled the entry since keeps it.

Events missed while the operator was stopped are caught by the sweep, at start and then every
`model_cache_sweep_seconds`: every key a cache PV still names (a ModelService deleted meanwhile
leaves its PV `Released`), read with pods, nodes and the eviction Jobs through the API, goes
through the same decision, :func:`plan_evictions`; a node that has an eviction Job of the key
already gets none, and the released PVs are deleted once their Jobs are written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubemaas_operator.builders.cache_eviction import (
    EVICT_COMPONENT,
    EVICT_COMPONENT_LABEL,
    NODE_ANNOTATION,
    build_evict_claim,
    build_evict_job,
    build_evict_volume,
)
from kubemaas_operator.builders.model_cache import (
    CACHE_KEY_LABEL,
    MODELSERVICE_NAMESPACE_LABEL,
    cache_volume_name,
)
from kubemaas_operator.kube import KubeClient
from kubemaas_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


def volume_refers(volume: Mapping[str, Any], key: str) -> bool:
    """Whether a cache PV still stands for a ModelService using ``key``."""
    meta = volume.get("metadata") or {}
    phase = (volume.get("status") or {}).get("phase")
    return (meta.get("labels") or {}).get(CACHE_KEY_LABEL) == key and not meta.get("deletionTimestamp") \
        and phase != "Released"


def pod_refers(pod: Mapping[str, Any], key: str) -> bool:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(CACHE_KEY_LABEL) == key


def referenced(key: str, volumes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> bool:
    return any(volume_refers(v, key) for v in volumes) or any(pod_refers(p, key) for p in pods)



def volume_key(volume: Mapping[str, Any]) -> str | None:
    return ((volume.get("metadata") or {}).get("labels") or {}).get(CACHE_KEY_LABEL)


def _released(volume: Mapping[str, Any]) -> bool:
    """A cache PV whose claim is gone (its ModelService deleted while this operator was away):
    it refers to nothing, and only the sweep's delete removes it."""
    return (volume.get("status") or {}).get("phase") == "Released" \
        and not (volume.get("metadata") or {}).get("deletionTimestamp")


def _job_entry(job: Mapping[str, Any]) -> tuple[str | None, str | None]:
    meta = job.get("metadata") or {}
    return (meta.get("labels") or {}).get(CACHE_KEY_LABEL), (meta.get("annotations") or {}).get(NODE_ANNOTATION)


@dataclass(frozen=True)
class Eviction:
    """What to do for one key nothing refers to: a Job on each of ``nodes``, and delete the
    ``released`` cache PVs that still carry the key (or every sweep would find it again)."""

    key: str
    nodes: tuple[str, ...]
    released: tuple[str, ...] = ()


def plan_evictions(keys: Iterable[str], volumes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
                   jobs: Iterable[Mapping[str, Any]], nodes: Iterable[str]) -> list[Eviction]:
    """The one decision, for the watch path (the key whose last reference just went, no Jobs:
    one decided before that event does not cover a fill since) and the sweep (every key a cache
    PV names, with the eviction Jobs there are): a key referred to by any of ``volumes`` or
    ``pods`` is left alone; otherwise a Job on every node of ``nodes`` that has no eviction Job
    of that key yet (running, done or failed: the Job's TTL bounds how soon a sweep tries again).
    With no node in the group there is nothing to run and the released PVs stay: they are the
    record of the key until a node can be told.
    """
    done = {_job_entry(job) for job in jobs}
    group = sorted(set(nodes))
    if not group:
        return []
    plans = []
    for key in sorted(set(keys)):
        if referenced(key, volumes, pods):
            continue
        todo = tuple(node for node in group if (key, node) not in done)
        released = tuple(sorted(v["metadata"]["name"] for v in volumes if volume_key(v) == key and _released(v)))
        if todo or released:
            plans.append(Eviction(key, todo, released))
    return plans


def eviction_objects(key: str, nodes: Sequence[str], decided_at: float, settings: OperatorSettings) -> list[dict]:
    """What to write to evict ``key``: the Jobs' volume and claim, then one Job per node."""
    if not nodes:
        return []
    return [build_evict_volume(settings), build_evict_claim(settings),
            *(build_evict_job(key, node, decided_at, settings) for node in sorted(nodes))]


def eviction_enabled(settings: OperatorSettings) -> bool:
    return settings.model_cache and bool(settings.model_cache_eviction_namespace)


def release_volume(kube: KubeClient, namespace: str, name: str) -> None:
    """A deleted ModelService's PV (its claim goes with the garbage collector; the PV waits for
    it under the pv-protection finalizer)."""
    kube.delete("PersistentVolume", "", cache_volume_name(namespace, name))


def carry_out(kube: KubeClient, settings: OperatorSettings, plans: Iterable[Eviction], decided_at: float) -> list[str]:
    """Write each plan's Jobs, then delete its released PVs (after the Jobs: a failed write
    leaves the key for the next sweep to find); the Jobs' names."""
    written = []
    for plan in plans:
        for obj in eviction_objects(plan.key, plan.nodes, decided_at, settings):
            kube.apply(obj)
            if obj["kind"] == "Job":
                written.append(obj["metadata"]["name"])
        for name in plan.released:
            kube.delete("PersistentVolume", "", name)
        log.info("no ModelService refers to the cache entry %s: evicting it on %d node(s)%s", plan.key,
                 len(plan.nodes), f", deleting the released PV(s) {', '.join(plan.released)}" if plan.released else "")
    return written


def evict_if_unreferenced(kube: KubeClient, settings: OperatorSettings, key: str,
                          pods: Sequence[Mapping[str, Any]], nodes: Sequence[str]) -> list[str]:
    """The watch path: run the eviction of ``key`` when nothing refers to it; the Jobs' names
    (none: referred to)."""
    if referenced(key, (), pods):
        return []
    decided_at = time.time()  # before the LIST: a pod that hits the entry later keeps it
    volumes = kube.list("PersistentVolume", "", f"{CACHE_KEY_LABEL}={key}")
    return carry_out(kube, settings, plan_evictions([key], volumes, pods, (), nodes), decided_at)


def sweep_keys(volumes: Iterable[Mapping[str, Any]], namespaces: Sequence[str]) -> set[str]:
    """The keys the sweep considers: those of the cache PVs of ModelServices in the namespaces
    this operator watches (all: cluster-wide), so a second release's entries are its own to
    sweep; what refers to a key still counts cluster-wide."""
    keys = set()
    for volume in volumes:
        key = volume_key(volume)
        namespace = ((volume.get("metadata") or {}).get("labels") or {}).get(MODELSERVICE_NAMESPACE_LABEL)
        if key and (not namespaces or namespace in namespaces):
            keys.add(key)
    return keys


def sweep(kube: KubeClient, settings: OperatorSettings) -> list[str]:
    """At start and every ``model_cache_sweep_seconds``: evict the entries no ModelService refers
    to whose last reference went while no watch event said so (the operator stopped). Everything
    is read through the API, not the operator's indexes (empty at start); a LIST that fails
    raises before anything is written, so a partial view evicts nothing."""
    decided_at = time.time()  # before the LISTs: a pod that hits an entry later keeps it
    volumes = kube.list("PersistentVolume", "", CACHE_KEY_LABEL)
    pods = [pod for namespace in settings.namespaces or ("",)
            for pod in kube.list("Pod", namespace, CACHE_KEY_LABEL)]
    nodes = [n["metadata"]["name"] for n in kube.list("Node", "", f"{settings.model_cache_node_label}=true")]
    jobs = kube.list("Job", settings.model_cache_eviction_namespace, f"{EVICT_COMPONENT_LABEL}={EVICT_COMPONENT}")
    plans = plan_evictions(sweep_keys(volumes, settings.namespaces), volumes, pods, jobs, nodes)
    return carry_out(kube, settings, plans, decided_at)
