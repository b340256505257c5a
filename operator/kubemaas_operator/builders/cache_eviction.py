"""Eviction of node-cache entries no ModelService refers to: the objects it runs (pure).

The entry `<key>` is on every node of the cache's node group where a pod of that key ran. Once
nothing refers to the key (cache_eviction.py decides), the operator runs, in its own namespace
(`model_cache_eviction_namespace`), one Job per node of the group:
`kubemaas-runtime cache-evict --root /cache --key <key> --used-before <the decision's time>`,
which removes exactly that entry under the entry's lock and keeps it when a pod used it since.

Least privilege: the Jobs mount the cache folder through the same kind of local PersistentVolume
the pods use (pre-bound to one claim in the operator's namespace, never a hostPath, which the
restricted Pod Security Standard forbids), run as the runtime's non-root user with the restricted
security context and no service account token; the operator needs Jobs and that one claim only
in its own namespace, and delete on the cluster-scoped PersistentVolumes it made.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubemaas_operator.builders.model_cache import (
    CACHE_KEY_LABEL,
    CACHE_MOUNT,
    CACHE_VOLUME,
    cache_labels,
    cache_volume_claim,
    local_cache_volume,
)
from kubemaas_operator.builders.pod import container_security_context, pod_security_context
from kubemaas_operator.settings import OperatorSettings

EVICT_CLAIM = "kubemaas-cache-evict"
EVICT_COMPONENT_LABEL = "app.kubernetes.io/component"
EVICT_COMPONENT = "model-cache-evict"
NODE_ANNOTATION = "kubemaas.io/node"
# The Job's pods name the key under their own label: a pod labelled kubemaas.io/model-cache-key is
# what the cached pods' preferred pod affinity is drawn to, and an eviction is no copy in use.
EVICT_KEY_LABEL = "kubemaas.io/model-cache-evict-key"
JOB_DEADLINE_SECONDS = 600
JOB_TTL_SECONDS = 3600  # a finished Job (and its pod's termination line) stays an hour to be read


def evict_volume_name(namespace: str) -> str:
    return f"{EVICT_CLAIM}-{namespace}"


def evict_job_name(key: str, node: str, decided_at: float) -> str:
    """One Job per entry, node and decision (a Job's template cannot change, and a key may be
    used and left again); a hash, as a node name can be 253 characters."""
    return f"{EVICT_CLAIM}-" + hashlib.sha256(f"{key}/{node}/{decided_at:.0f}".encode()).hexdigest()[:16]


def _labels() -> dict[str, str]:
    return {**cache_labels(None), EVICT_COMPONENT_LABEL: EVICT_COMPONENT}


def build_evict_volume(settings: OperatorSettings) -> dict[str, Any]:
    """The Jobs' local PV over the cache folder: no key label, so it is no reference to any entry."""
    namespace = settings.model_cache_eviction_namespace
    return local_cache_volume(evict_volume_name(namespace), namespace, EVICT_CLAIM, _labels(), settings)


def build_evict_claim(settings: OperatorSettings) -> dict[str, Any]:
    namespace = settings.model_cache_eviction_namespace
    return cache_volume_claim(EVICT_CLAIM, namespace, evict_volume_name(namespace), _labels(), settings, None)


def build_evict_job(key: str, node: str, decided_at: float, settings: OperatorSettings) -> dict[str, Any]:
    """The Job that removes `key` from `node`'s cache folder."""
    labels = {**_labels(), CACHE_KEY_LABEL: key}
    pod_labels = {**_labels(), EVICT_KEY_LABEL: key}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {**pod_security_context(), "fsGroupChangePolicy": "OnRootMismatch"},
        # exactly this node (the way a DaemonSet pins its pods), through the scheduler, so the
        # local PV's node affinity is checked; the group's taints (GPU nodes') are tolerated
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}}},
        "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{
            "name": "cache-evict",
            "image": settings.runtime_image,
            "args": ["cache-evict", "--root", CACHE_MOUNT, "--key", key, "--used-before", f"{decided_at:.0f}"],
            "securityContext": container_security_context(),
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}],
        }],
        "volumes": [{"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": EVICT_CLAIM}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": evict_job_name(key, node, decided_at), "namespace": settings.model_cache_eviction_namespace,
                     "labels": labels, "annotations": {NODE_ANNOTATION: node}},
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": JOB_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": pod_labels, "annotations": {NODE_ANNOTATION: node}},
                         "spec": pod_spec},
        },
    }
