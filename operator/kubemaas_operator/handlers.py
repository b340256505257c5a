"""kopf registration, and nothing else: each handler unpacks kopf's arguments and calls
:mod:`kubemaas_operator.reconcile`.

Handlers are sync: kopf runs them in its thread pool, so the blocking Kubernetes client never
stalls the event loop. Children are followed through kopf indexes (in-memory caches fed by
watches), so status follows reality without polling and without a LIST per event.
"""

from __future__ import annotations

import logging
import time

import kopf
from pydantic import ValidationError

from kubemaas_operator import gpufit, metrics, policy
from kubemaas_operator.api import ModelService, describe_errors
from kubemaas_operator.api.constants import GROUP, PLURAL, VERSION
from kubemaas_operator.kube import KubeClient, load_api_client
from kubemaas_operator.reconcile import MODELSERVICE_LABEL, Key, Reconciler
from kubemaas_operator.rollout import ObservedDeployment
from kubemaas_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
CHILD = {MODELSERVICE_LABEL: kopf.PRESENT}
KOPF_PREFIX = f"kopf.{GROUP}"
CANARY_TICK_SECONDS = 3


def _owner_key(namespace: str | None, labels: dict) -> Key:
    return (namespace or "", labels[MODELSERVICE_LABEL])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    op_settings: OperatorSettings = memo.settings
    # kopf's bookkeeping lives in annotations, so the status schema stays strict and ours alone.
    # Its prefix must not be kubemaas.io: kopf leaves annotations under its own prefix out of
    # the diff, and a user's kubemaas.io/* annotation (the image policy) must trigger updates.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING  # we post our own Events for transitions
    settings.execution.max_workers = op_settings.workers
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    settings.batching.error_delays = [1, 2, 5, 10, 20, 30]
    memo.reconciler = Reconciler(KubeClient(load_api_client(), op_settings.field_manager),
                                 op_settings)
    metrics.serve(op_settings.metrics_port)


# --- indexes: what the status is computed from ---------------------------------------------

@kopf.index(GROUP, VERSION, PLURAL)
def modelservice_index(namespace, name, body, **_):
    return {(namespace, name): body}


@kopf.index("apps", "v1", "deployments", labels=CHILD)
def deployment_index(namespace, labels, body, **_):
    return {_owner_key(namespace, labels): {
        "metadata": {"name": body["metadata"]["name"],
                     "generation": body["metadata"].get("generation", 0),
                     "labels": dict(labels)},
        "spec": {"replicas": body.get("spec", {}).get("replicas", 1)},
        "status": dict(body.get("status", {})),
    }}


@kopf.index("", "v1", "pods", labels=CHILD)
def pod_index(namespace, labels, body, **_):
    return {_owner_key(namespace, labels): {"metadata": {"labels": dict(labels)},
                                            "status": dict(body.get("status", {}))}}


# The cluster's GPUs for the GPU-fit check, from GPU feature discovery's node labels. Nodes are
# cluster-scoped: this needs get/list/watch on nodes (the chart's ClusterRole, also with
# watchNamespaces). Every node counts under NODES, so "no node seen" (nodes not readable) is
# told apart from "no GPU node": the first places as without the check, the second refuses.
NODES, GPU_NODES = "nodes", "gpus"


@kopf.index("", "v1", "nodes")
def node_index(name, labels, memo, **_):
    settings: OperatorSettings = memo.settings
    gpu = gpufit.GpuNode.from_labels(name, labels, settings.gpu_memory_label, settings.gpu_product_label)
    return {NODES: name, **({GPU_NODES: gpu} if gpu else {})}


def _gpu_nodes(node_index) -> tuple[gpufit.GpuNode, ...] | None:
    if not node_index.get(NODES):
        return None
    return tuple(sorted(node_index.get(GPU_NODES, ()), key=lambda n: n.name))


def _observed(deployment_index, key: Key) -> list[ObservedDeployment]:
    found = (ObservedDeployment.from_object(d) for d in deployment_index.get(key, ()))
    return [d for d in found if d is not None]


# --- the ModelService itself --------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_modelservice(body, status, reason, memo, deployment_index, pod_index, node_index, **_) -> None:
    reconciler: Reconciler = memo.reconciler
    started = time.perf_counter()
    result = "error"
    try:
        try:
            ms = ModelService.from_body(body)
        except ValidationError as exc:
            result = "invalid"
            _refuse(reconciler, body, exc)
            raise kopf.PermanentError(f"invalid spec: {exc}") from exc
        key = (ms.namespace, ms.name)
        refused = policy.refusal(ms, reconciler.settings, status.get("runtimeImage"))
        if refused is not None:
            result = "refused"
            reconciler.forget(key)  # events of earlier children must not overwrite the refusal
            _write_refusal(reconciler, body, refused.reason, refused.message)
            raise kopf.PermanentError(f"{refused.reason}: {refused.message}")
        plan = reconciler.reconcile(ms, pinned_image=status.get("runtimeImage"),
                                    prune=reason != kopf.Reason.CREATE,
                                    observed=_observed(deployment_index, key), status=dict(status),
                                    gpu_nodes=_gpu_nodes(node_index))
        _refresh(reconciler, plan.key, body, deployment_index, pod_index)
        blocking = reconciler.blocking.get(plan.key)
        result = "blocked" if blocking else "applied"
        # GPUMemoryInsufficient needs no retry: a change of the nodes re-plans (node_changed)
        if blocking and blocking.reason != gpufit.FIT_REASON:
            raise kopf.TemporaryError(f"{blocking.reason}: {blocking.message}", delay=30)
    finally:
        metrics.record_reconcile(result, time.perf_counter() - started)
        metrics.MANAGED.set(len(reconciler.plans))


def _refuse(reconciler: Reconciler, body, exc: ValidationError) -> None:
    message = f"{'; '.join(describe_errors(exc))}. Fix the spec; nothing was created."
    _write_refusal(reconciler, body, "InvalidSpec", message)


def _write_refusal(reconciler: Reconciler, body, reason: str, message: str) -> None:
    condition = {"type": "Ready", "status": "False", "reason": reason, "message": message,
                 "observedGeneration": body["metadata"].get("generation", 0),
                 "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    reconciler.kube.patch_status(body["metadata"]["namespace"], body["metadata"]["name"],
                                 {"conditions": [condition]})
    kopf.warn(dict(body), reason=reason, message=message)


def _rollout_moving(status, **_) -> bool:
    rollout = (status or {}).get("rollout") or {}
    return rollout.get("strategy") == "Canary" and rollout.get("phase") == "Progressing"


@kopf.timer(GROUP, VERSION, PLURAL, interval=CANARY_TICK_SECONDS, when=_rollout_moving)
def advance_canary(body, status, memo, deployment_index, pod_index, node_index, **_) -> None:
    """While a canary moves (scaling, pausing, retiring), re-plan it every few seconds: a
    pause ends on time and a step whose pods became available is routed. Idle ModelServices
    have no timer; a held step waits for a spec change (the update handler)."""
    reconciler: Reconciler = memo.reconciler
    try:
        ms = ModelService.from_body(body)
    except ValidationError:
        return  # the update handler reported it
    key = (ms.namespace, ms.name)
    reconciler.reconcile(ms, pinned_image=status.get("runtimeImage"), observed=_observed(deployment_index, key),
                         status=dict(status), only_changes=True, gpu_nodes=_gpu_nodes(node_index))
    _refresh(reconciler, key, body, deployment_index, pod_index)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)  # optional: no finalizer, GC does the rest
def modelservice_deleted(namespace, name, memo, **_) -> None:
    memo.reconciler.forget((namespace, name))


# --- children: status and drift -----------------------------------------------------------

@kopf.on.event("apps", "v1", "deployments", labels=CHILD)
def deployment_event(type, namespace, labels, body, memo, modelservice_index,
                     deployment_index, pod_index, node_index, **_) -> None:
    reconciler: Reconciler = memo.reconciler
    key = _owner_key(namespace, labels)
    parent = _parent(modelservice_index, key)
    if parent is None:
        return
    with reconciler.lock(key):  # a reconcile in flight records its generations first
        drifted = type != "DELETED" and reconciler.drifted(namespace, body)
    if drifted:
        log.info("Deployment %s/%s was changed by hand; putting it back", namespace,
                 body["metadata"]["name"])
        ms = ModelService.from_body(parent)
        reconciler.reconcile(ms, pinned_image=parent.get("status", {}).get("runtimeImage"),
                             observed=_observed(deployment_index, key), status=parent.get("status"),
                             gpu_nodes=_gpu_nodes(node_index))
    _refresh(reconciler, key, parent, deployment_index, pod_index)


@kopf.on.event("", "v1", "pods", labels=CHILD)
def pod_event(namespace, labels, memo, modelservice_index, deployment_index, pod_index,
              **_) -> None:
    key = _owner_key(namespace, labels)
    parent = _parent(modelservice_index, key)
    if parent is not None:
        _refresh(memo.reconciler, key, parent, deployment_index, pod_index)


@kopf.on.event("", "v1", "nodes")
def node_changed(memo, modelservice_index, deployment_index, pod_index, node_index, **_) -> None:
    """When the cluster's GPUs change (a node added, removed or relabelled), re-plan every
    ModelService with a GPU-fit estimate: a refused variant may fit now, or no longer."""
    reconciler: Reconciler = memo.reconciler
    gpus = _gpu_nodes(node_index)
    with reconciler.lock(GPU_INVENTORY_KEY):
        if gpus == reconciler.gpu_nodes:
            return  # a heartbeat or a status change: the GPUs are the same
        reconciler.gpu_nodes = gpus
    for key, plan in list(reconciler.plans.items()):
        parent = _parent(modelservice_index, key)
        if not plan.fits or parent is None:
            continue
        try:
            ms = ModelService.from_body(parent)
        except ValidationError:
            continue
        reconciler.reconcile(ms, pinned_image=(parent.get("status") or {}).get("runtimeImage"),
                             observed=_observed(deployment_index, key), status=parent.get("status"),
                             gpu_nodes=gpus)
        _refresh(reconciler, key, parent, deployment_index, pod_index)


GPU_INVENTORY_KEY: Key = ("", "gpu-nodes")


def _parent(modelservice_index, key: Key):
    for body in modelservice_index.get(key, ()):
        return body
    return None


def _refresh(reconciler: Reconciler, key: Key, parent, deployment_index, pod_index) -> None:
    """Recompute status from the indexes; write it (and an Event) only when it changed."""
    with reconciler.lock(key):
        previous = reconciler.last_status.get(key) or dict(parent.get("status") or {})
        status = reconciler.status_for(key, list(deployment_index.get(key, ())),
                                       list(pod_index.get(key, ())),
                                       previous.get("conditions"))
        if status is None:
            return
        reconciler.write_status(key, status)
    _post_transition(parent, previous.get("conditions") or [], status["conditions"])


def _post_transition(parent, before: list[dict], after: list[dict]) -> None:
    old = {c["type"]: c for c in before}
    ready = next(c for c in after if c["type"] == "Ready")
    prev = old.get("Ready")
    if prev and (prev["status"], prev.get("reason")) == (ready["status"], ready["reason"]):
        return
    kind = "Normal" if ready["status"] == "True" else "Warning"
    if ready["reason"] == "WaitingForReplicas":
        kind = "Normal"
    kopf.event(dict(parent), type=kind, reason=ready["reason"], message=ready["message"])
