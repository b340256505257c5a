"""The node-local model cache (`spec.model.cache: node`): what the operator renders for it.

Every node of the cache's node group (nodes labelled `<model_cache_node_label>=true`) has the
folder `model_cache_path`; each model URI with its revision has one entry there, `<key>`, filled
once per node by the first pod's fetch step (`kubemaas-runtime fetch --cache`).

Pods reach the folder through a `local` PersistentVolume, never a hostPath (which the restricted
Pod Security Standard forbids):
- per ModelService, a PV `kubemaas-cache-<namespace>-<name>` over `model_cache_path` whose
  required node affinity is the node group (every node has its own copy at the same path), pre-bound
  to the claim `<name>-model-cache` in the ModelService's namespace (owned by the ModelService);
- the fetch init container mounts the claim read-write at /cache and fills `/cache/<key>`;
  the runtime container mounts only `<key>` (subPath), read-only, at /mnt/models;
- pods carry the label `kubemaas.io/model-cache-key: <key>` and a *preferred* pod affinity to
  pods with the same key on the same node (topology `kubernetes.io/hostname`): they prefer nodes
  where the copy is in use, without the operator writing Node objects (docs/api.md says why).

The per-node status is read from the fetch step's KubemaasCache report (cache_status.py); an
entry no ModelService refers to is evicted by Jobs (cache_eviction.py, builders/cache_eviction.py).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from kubemaas_operator.api import ModelService
from kubemaas_operator.builders.naming import common_labels, owner_reference
from kubemaas_operator.runtime_contract import MODEL_DIR
from kubemaas_operator.settings import OperatorSettings

CACHE_VOLUME = "model-cache"
CACHE_MOUNT = "/cache"
CACHE_KEY_LABEL = "kubemaas.io/model-cache-key"
MODELSERVICE_NAMESPACE_LABEL = "kubemaas.io/modelservice-namespace"
CACHE_STORAGE_CLASS = "kubemaas-model-cache"  # no provisioner: every PV is made and pre-bound here
HOSTNAME_LABEL = "kubernetes.io/hostname"
_KEY_HASH_LENGTH = 12
_KEY_STEM_LENGTH = 40


def cache_key(uri: str) -> str:
    """The entry's name for a URI with its revision: a readable stem and a hash of the whole
    URI, a DNS label (a label value, a Job name part, a folder name).
    `hf://org/name@rev` -> `name-<12 hex>`."""
    stem = uri.split("://", 1)[-1].split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    stem = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:_KEY_STEM_LENGTH].strip("-") or "model"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:_KEY_HASH_LENGTH]
    return f"{stem}-{digest}"


def uses_node_cache(ms: ModelService) -> bool:
    return ms.spec.model.cache == "node"


def cache_claim_name(ms_name: str) -> str:
    return f"{ms_name}-model-cache"


def cache_volume_name(namespace: str, ms_name: str) -> str:
    return f"kubemaas-cache-{namespace}-{ms_name}"


def cache_labels(key: str | None) -> dict[str, str]:
    """The labels of the cache's volumes and claims; `key` (the entry a ModelService uses) is
    what eviction counts as a reference, so the eviction Jobs' own volume carries none."""
    labels = {"app.kubernetes.io/part-of": "kubemaas", "app.kubernetes.io/managed-by": "kubemaas-operator"}
    return labels if key is None else {**labels, CACHE_KEY_LABEL: key}


def node_group_affinity(settings: OperatorSettings) -> dict[str, Any]:
    """The PV's required node affinity: the nodes that have the cache folder."""
    return {"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": settings.model_cache_node_label, "operator": "In", "values": ["true"]}]}]}}


def local_cache_volume(name: str, claim_namespace: str, claim: str, labels: dict[str, str],
                       settings: OperatorSettings) -> dict[str, Any]:
    """A local PV over the cache folder on the node group, pre-bound to `claim_namespace/claim`."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "capacity": {"storage": settings.model_cache_capacity},
            "accessModes": ["ReadWriteOnce"],  # per node: each node mounts its own folder
            "persistentVolumeReclaimPolicy": "Retain",  # the copy outlives the claim; eviction deletes it
            "storageClassName": CACHE_STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "local": {"path": settings.model_cache_path},
            "nodeAffinity": node_group_affinity(settings),
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": claim_namespace, "name": claim},
        },
    }


def cache_volume_claim(name: str, namespace: str, volume: str, labels: dict[str, str],
                       settings: OperatorSettings, owner: dict[str, Any] | None) -> dict[str, Any]:
    """The claim bound to local_cache_volume's PV `volume`."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": CACHE_STORAGE_CLASS,
            "volumeName": volume,
            "resources": {"requests": {"storage": settings.model_cache_capacity}},
        },
    }


def build_cache_volume(ms: ModelService, settings: OperatorSettings) -> dict[str, Any]:
    """The cluster-scoped local PV of a ModelService's cache (no owner: a cluster-scoped object
    cannot be owned by a namespaced one; eviction deletes it)."""
    key = cache_key(ms.spec.model.uri)
    volume = local_cache_volume(cache_volume_name(ms.namespace, ms.name), ms.namespace,
                                cache_claim_name(ms.name), cache_labels(key), settings)
    volume["metadata"]["labels"][MODELSERVICE_NAMESPACE_LABEL] = ms.namespace
    volume["metadata"]["labels"]["kubemaas.io/modelservice"] = ms.name
    return volume


def reopen_released_volume(volume: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The JSON patch that lets a ModelService created again under a deleted one's name bind
    its PV, or None when there is nothing to reopen. The PV is kept `Released` until the
    deleted one's eviction succeeded on every node (cache_eviction.py), and a `Released` PV
    keeps the gone claim's uid in `claimRef`: the PV controller binds no new claim to it, and the
    new ModelService's pods, which refer to the key, would keep the eviction from ever ending.
    Removing the uid (tested against the one read, so a bind since is left alone) makes it
    pre-bound by name again, to the new claim."""
    uid = ((volume.get("spec") or {}).get("claimRef") or {}).get("uid")
    if (volume.get("status") or {}).get("phase") != "Released" or not uid \
            or (volume.get("metadata") or {}).get("deletionTimestamp"):
        return None
    return [{"op": "test", "path": "/spec/claimRef/uid", "value": uid},
            {"op": "remove", "path": "/spec/claimRef/uid"}]


def build_cache_claim(ms: ModelService, settings: OperatorSettings) -> dict[str, Any]:
    """The claim the pods mount, bound to build_cache_volume's PV, owned by the ModelService."""
    claim = cache_volume_claim(cache_claim_name(ms.name), ms.namespace, cache_volume_name(ms.namespace, ms.name),
                               cache_labels(cache_key(ms.spec.model.uri)), settings, owner_reference(ms))
    claim["metadata"]["labels"] = {**common_labels(ms.name, "model-cache"), **claim["metadata"]["labels"]}
    return claim


def cache_pod_volume(ms: ModelService) -> dict[str, Any]:
    return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache_claim_name(ms.name)}}


def cache_runtime_mount(ms: ModelService) -> dict[str, Any]:
    """The runtime sees only its entry, read-only, where it always finds the model."""
    return {"name": CACHE_VOLUME, "mountPath": MODEL_DIR, "subPath": cache_key(ms.spec.model.uri),
            "readOnly": True}


def cache_fetch_args(ms: ModelService) -> list[str]:
    """The fetch step's --dest and --cache: it fills (or finds) the node's entry."""
    return ["--dest", f"{CACHE_MOUNT}/{cache_key(ms.spec.model.uri)}", "--cache"]


def cache_fetch_mount() -> dict[str, Any]:
    return {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}


def cache_pod_affinity(ms: ModelService) -> dict[str, Any]:
    """Preferred: nodes already running a pod with this entry (so the copy is there)."""
    return {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {
            "labelSelector": {"matchLabels": {CACHE_KEY_LABEL: cache_key(ms.spec.model.uri)}},
            "namespaceSelector": {},  # the same copy serves every namespace's pods
            "topologyKey": HOSTNAME_LABEL,
        },
    }]}}


def with_cache_affinity(affinity: dict[str, Any] | None, ms: ModelService) -> dict[str, Any]:
    """`affinity` plus the cache's preferred pod affinity (the user's own terms kept)."""
    merged = dict(affinity or {})
    ours = cache_pod_affinity(ms)["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    pod_affinity = dict(merged.get("podAffinity") or {})
    pod_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
        *pod_affinity.get("preferredDuringSchedulingIgnoredDuringExecution", []), *ours]
    merged["podAffinity"] = pod_affinity
    return merged
