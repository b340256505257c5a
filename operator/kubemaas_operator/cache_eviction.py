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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubemaas_operator.builders.cache_eviction import (
    build_evict_claim,
    build_evict_job,
    build_evict_volume,
)
from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL, cache_volume_name
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


def evict_if_unreferenced(kube: KubeClient, settings: OperatorSettings, key: str,
                          pods: Iterable[Mapping[str, Any]], nodes: Sequence[str]) -> list[str]:
    """Run the eviction of ``key`` when nothing refers to it; the Jobs' names (none: referred to)."""
    if referenced(key, [], pods):
        return []
    decided_at = time.time()
    if referenced(key, kube.list("PersistentVolume", "", f"{CACHE_KEY_LABEL}={key}"), ()):
        return []
    written = []
    for obj in eviction_objects(key, nodes, decided_at, settings):
        kube.apply(obj)
        if obj["kind"] == "Job":
            written.append(obj["metadata"]["name"])
    if written:
        log.info("no ModelService refers to the cache entry %s: evicting it on %d node(s)", key, len(written))
    return written
