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
leaves its PV `Released`) or a failed eviction Job of a node of the group names, read with pods,
nodes and the eviction Jobs through the API, goes through the same decision,
:func:`plan_evictions`. An eviction is done only when it succeeded on every node of the group:
a node whose latest Job of the key runs waits, one whose latest Job failed gets a new Job (the
failed one is deleted after it: the sweep's period is the back-off), and the key's released PVs
are deleted only once every node's latest Job of the key succeeded. A node that left the group
no longer counts.
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


def job_state(job: Mapping[str, Any]) -> str:
    """``succeeded`` or ``failed`` once the Job controller says it finished (its `Complete` or
    `Failed` condition), else ``running`` (pending, running, or failing towards its retries)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return "succeeded" if condition["type"] == "Complete" else "failed"
    return "running"


def _job_order(job: Mapping[str, Any]) -> tuple[str, str]:
    meta = job.get("metadata") or {}
    return meta.get("creationTimestamp") or "", meta.get("name") or ""


def _history(jobs: Iterable[Mapping[str, Any]]) -> dict[tuple[str | None, str | None], list[Mapping[str, Any]]]:
    """The eviction Jobs of each (key, node), oldest first: the latest one says where it stands."""
    entries: dict[tuple[str | None, str | None], list[Mapping[str, Any]]] = {}
    for job in sorted(jobs, key=_job_order):
        entries.setdefault(_job_entry(job), []).append(job)
    return entries


def retry_keys(jobs: Iterable[Mapping[str, Any]], nodes: Iterable[str]) -> set[str]:
    """The keys of failed eviction Jobs on nodes of the group: the sweep takes them up again
    although no cache PV names them (a rollout's earlier revision; a ModelService whose PV went
    at its deletion)."""
    group = set(nodes)
    return {key for job in jobs for key, node in [_job_entry(job)]
            if key and node in group and job_state(job) == "failed"}


@dataclass(frozen=True)
class Eviction:
    """What to do for one key nothing refers to: a Job on each of ``nodes``; delete the
    ``failed`` eviction Jobs of the key (after the new ones are written, so the key keeps a
    record); and, once every node of the group evicted it, the ``released`` cache PVs that still
    carry the key (or every sweep would find it again)."""

    key: str
    nodes: tuple[str, ...]
    released: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


def plan_evictions(keys: Iterable[str], volumes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
                   jobs: Iterable[Mapping[str, Any]], nodes: Iterable[str]) -> list[Eviction]:
    """The one decision, for the watch path (the key whose last reference just went, no Jobs:
    one decided before that event does not cover a fill since) and the sweep (every key a cache
    PV or a failed eviction Job names, with the eviction Jobs there are): a key referred to by
    any of ``volumes`` or ``pods`` is left alone. Otherwise, on each node of ``nodes`` (the
    group; a node that left it no longer counts), by the latest eviction Job of the key there:
    none or failed, a new Job (every failed one is deleted); running, nothing (never a second
    Job beside it); succeeded, the node is done. Only when every node is done are the key's
    released PVs deleted: until then they are the key's record. With no node in the group there
    is nothing to run and the released PVs stay, the record until a node can be told.
    """
    history = _history(jobs)
    group = sorted(set(nodes))
    if not group:
        return []
    plans = []
    for key in sorted(set(keys)):
        if referenced(key, volumes, pods):
            continue
        kept = [v for v in volumes if volume_key(v) == key and _released(v)]
        # a Job older than a released PV of the key (one left by an earlier eviction, not yet
        # collected) decided before that ModelService's pods used the entry: it does not count
        since = max(((v.get("metadata") or {}).get("creationTimestamp") or "" for v in kept), default="")
        todo, failed, latest = [], [], {}
        for node in group:
            entry = history.get((key, node), [])
            failed += [job["metadata"]["name"] for job in entry if job_state(job) == "failed"]
            counted = [job for job in entry if _job_order(job)[0] >= since]
            latest[node] = "running" if any(job_state(job) == "running" for job in entry) \
                else job_state(counted[-1]) if counted else None  # never a second Job beside a running one
            if latest[node] in (None, "failed"):
                todo.append(node)
        done = all(state == "succeeded" for state in latest.values())
        released = tuple(sorted(v["metadata"]["name"] for v in kept)) if done else ()
        if todo or failed or released:
            plans.append(Eviction(key, tuple(todo), released, tuple(sorted(failed))))
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
    """Write each plan's Jobs, then delete its failed Jobs (after the new ones: a failed write
    leaves the key's record for the next sweep), then its released PVs (planned only once every
    node succeeded); the written Jobs' names."""
    written = []
    for plan in plans:
        for obj in eviction_objects(plan.key, plan.nodes, decided_at, settings):
            kube.apply(obj)
            if obj["kind"] == "Job":
                written.append(obj["metadata"]["name"])
        for name in plan.failed:
            kube.delete("Job", settings.model_cache_eviction_namespace, name)  # its pods go in the background
        for name in plan.released:
            kube.delete("PersistentVolume", "", name)
        if plan.nodes:
            log.info("no ModelService refers to the cache entry %s: evicting it on %d node(s)%s", plan.key,
                     len(plan.nodes), f", again after the failed Job(s) {', '.join(plan.failed)}" if plan.failed else "")
        elif plan.failed:
            log.info("deleting the failed eviction Job(s) %s of %s, superseded", ", ".join(plan.failed), plan.key)
        if plan.released:
            log.info("the cache entry %s is evicted on every node of the group: deleting the released PV(s) %s",
                     plan.key, ", ".join(plan.released))
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
    to whose last reference went while no watch event said so (the operator stopped), and run
    again the evictions that failed on a node (unreachable, say) until they succeed. Everything
    is read through the API, not the operator's indexes (empty at start); a LIST that fails
    raises before anything is written, so a partial view evicts nothing."""
    decided_at = time.time()  # before the LISTs: a pod that hits an entry later keeps it
    volumes = kube.list("PersistentVolume", "", CACHE_KEY_LABEL)
    pods = [pod for namespace in settings.namespaces or ("",)
            for pod in kube.list("Pod", namespace, CACHE_KEY_LABEL)]
    nodes = [n["metadata"]["name"] for n in kube.list("Node", "", f"{settings.model_cache_node_label}=true")]
    jobs = kube.list("Job", settings.model_cache_eviction_namespace, f"{EVICT_COMPONENT_LABEL}={EVICT_COMPONENT}")
    keys = sweep_keys(volumes, settings.namespaces) | retry_keys(jobs, nodes)
    plans = plan_evictions(keys, volumes, pods, jobs, nodes)
    return carry_out(kube, settings, plans, decided_at)
