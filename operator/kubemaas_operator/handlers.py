"""kopf registration: each handler unpacks kopf's arguments and goes down one shared path.

Handlers are async and cheap: a reconcile (blocking API calls) runs in the operator's thread
pool; a child's event only marks its ModelService's status for a refresh, and
:class:`~kubemaas_operator.refresh.StatusRefresher` folds the events of a short window into at
most one status computation and one write. Children are followed through kopf indexes
(in-memory caches fed by watches), so status follows reality without polling and without a
LIST per event, and a child's name held by another ModelService is known without a GET.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from kubemaas_operator import cache_eviction, metrics, placement, policy
from kubemaas_operator.api import Condition, ModelService, ModelServiceStatus, describe_errors
from kubemaas_operator.api.constants import GROUP, KIND, PLURAL, VERSION
from kubemaas_operator.builders import PinnedImages
from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL, cache_key, uses_node_cache
from kubemaas_operator.builders.raycluster import GROUP_LABEL
from kubemaas_operator.diffbase import LeanDiffBaseStorage
from kubemaas_operator.events import post_event
from kubemaas_operator.kube import KubeClient, load_api_client
from kubemaas_operator.problem import Problem
from kubemaas_operator.reconcile import MODELSERVICE_LABEL, VARIANT_REFUSAL_REASONS, Key, Reconciler
from kubemaas_operator.refresh import Indexes, StatusRefresher, deployment_view
from kubemaas_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
CHILD = {MODELSERVICE_LABEL: kopf.PRESENT}
KOPF_PREFIX = f"kopf.{GROUP}"
CANARY_TICK_SECONDS = 3
BLOCKED_RETRY_SECONDS = 30
IDLE_WORKER_SECONDS = 0.5


def _owner_key(namespace: str | None, labels: Any) -> Key:
    return (namespace or "", labels[MODELSERVICE_LABEL])


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    op_settings: OperatorSettings = memo.settings
    # kopf's bookkeeping lives in annotations, so the status schema stays strict and ours alone.
    # Its prefix must not be kubemaas.io: kopf leaves annotations under its own prefix out of
    # the diff, and a user's kubemaas.io/* annotation (the image policy) must trigger updates.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    memo.diffbase = settings.persistence.diffbase_storage = LeanDiffBaseStorage(
        kinds=[KIND], prefix=KOPF_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING  # we post our own Events for transitions
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    settings.batching.error_delays = [1, 2, 5, 10, 20, 30]
    # kopf's per-object worker keeps the last raw event it handled (the whole object, with
    # managedFields) while it idles; at its default 5 s every object that changed in the last
    # seconds is held twice. The profile at 500 ModelServices showed these events as the largest
    # part of the peak (docs/operator.md, "What the profile showed").
    settings.queueing.idle_timeout = IDLE_WORKER_SECONDS
    memo.pool = ThreadPoolExecutor(op_settings.workers, thread_name_prefix="kubemaas")
    kube = KubeClient(load_api_client(op_settings.workers), op_settings.field_manager)
    memo.reconciler = Reconciler(kube, op_settings)
    memo.refresher = StatusRefresher(kube, memo.pool,
                                     repair=lambda parent, indexes: _reconcile(memo, parent, indexes))
    metrics.MANAGED.set_function(lambda: len(memo.refresher.store.managed()))  # read at each scrape
    metrics.serve(op_settings.metrics_port)


@kopf.on.startup()
async def start_cache_sweep(memo: kopf.Memo, **_) -> None:
    """The node cache's sweep (cache_eviction.sweep), at start and then periodically: evictions
    whose watch event came while the operator was stopped. Registered after ``configure``, whose
    pool and client it uses (kopf runs startup handlers in order)."""
    if cache_eviction.eviction_enabled(memo.settings):
        memo.cache_sweep = asyncio.create_task(_sweep_cache(memo))


async def _sweep_cache(memo: kopf.Memo) -> None:
    settings: OperatorSettings = memo.settings
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(memo.pool, cache_eviction.sweep, memo.reconciler.kube, settings)
        except Exception:  # a background loop, not a handler: one failed pass must not end the sweep
            log.exception("the node cache's sweep failed (a failed read evicts nothing); next pass in %d s",
                          settings.model_cache_sweep_seconds)
        await asyncio.sleep(settings.model_cache_sweep_seconds)


@kopf.on.cleanup()
async def stop_cache_sweep(memo: kopf.Memo, **_) -> None:
    sweep = memo.get("cache_sweep")
    if sweep is not None:
        sweep.cancel()


@kopf.on.cleanup()
def stop_pool(memo: kopf.Memo, **_) -> None:
    memo.pool.shutdown(wait=False, cancel_futures=True)


# --- indexes: what status is computed from, and who holds which child's name ---------------

@kopf.index(GROUP, VERSION, PLURAL)
async def modelservice_index(namespace, name, body, **_):
    """The ModelService as the reconcile parses it: without managedFields and kopf's own
    annotations (its last-handled configuration is a second copy of the spec)."""
    meta = body["metadata"]
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "generation", "labels") if k in meta}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(KOPF_PREFIX)}
    return {(namespace, name): {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                                "metadata": {**kept, "annotations": annotations},
                                "spec": body.get("spec"), "status": body.get("status")}}


@kopf.index("apps", "v1", "deployments", labels=CHILD)
async def deployment_index(namespace, labels, body, **_):
    return {_owner_key(namespace, labels): deployment_view(body)}


@kopf.index("", "v1", "pods", labels=CHILD)
async def pod_index(namespace, labels, body, **_):
    """Labels, node and status: the node and the fetch step's termination line are the
    per-node cache status (cache_status.py)."""
    return {_owner_key(namespace, labels): {"metadata": {"labels": dict(labels)},
                                            "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
                                            "status": dict(body.get("status", {}))}}


# The workers of a group over several nodes (builders/raycluster) carry no modelservice label (no
# Service sends them requests) but kubemaas.io/group-of: status counts them with the head.
WORKER = {GROUP_LABEL: kopf.PRESENT, MODELSERVICE_LABEL: kopf.ABSENT}


@kopf.index("", "v1", "pods", labels=WORKER)
async def worker_pod_index(namespace, labels, body, **_):
    return {(namespace or "", labels[GROUP_LABEL]): {"metadata": {"labels": dict(labels)},
                                                    "status": dict(body.get("status", {}))}}


def _controller(meta) -> tuple[str, str, str]:
    """(uid, kind, name) of an object's controller, or empty strings."""
    for ref in meta.get("ownerReferences") or ():
        if ref.get("controller"):
            return ref.get("uid", ""), ref.get("kind", ""), ref.get("name", "")
    return "", "", ""


# Children's names (Deployments and Services: the kinds two ModelServices' names can collide
# in) -> their controller; every ModelService writes under one field manager, so the apply
# itself would not refuse one ModelService's object to another.
@kopf.index("apps", "v1", "deployments", labels=CHILD)
async def deployment_names(namespace, name, meta, **_):
    return {(namespace, name): _controller(meta)}


@kopf.index("", "v1", "services", labels=CHILD)
async def service_names(namespace, name, meta, **_):
    return {(namespace, name): _controller(meta)}


# The cluster's GPUs for the GPU-fit check, from GPU feature discovery's node labels. Nodes are
# cluster-scoped: this needs get/list/watch on nodes (the chart's ClusterRole, also with
# watchNamespaces). Every node counts under NODES, so "no node seen" (nodes not readable) is
# told apart from "no GPU node": the first places as without the check, the second refuses.
# CACHE_NODES: the node group of the model cache (its label "true"), where eviction runs its Jobs.
NODES, GPU_NODES, CACHE_NODES = "nodes", "gpus", "cache-nodes"


@kopf.index("", "v1", "nodes")
async def node_index(name, labels, status, memo, **_) -> dict:
    settings: OperatorSettings = memo.settings
    allocatable = str(((status or {}).get("allocatable") or {}).get(settings.gpu_resource_name, ""))
    gpu = placement.GpuNode.from_labels(name, labels, settings.gpu_memory_label, settings.gpu_product_label,
                                     gpus=int(allocatable) if allocatable.isdigit() else None)
    cache = labels.get(settings.model_cache_node_label) == "true"
    return {NODES: name, **({GPU_NODES: gpu} if gpu else {}), **({CACHE_NODES: name} if cache else {})}


def _gpu_nodes(node_index) -> tuple[placement.GpuNode, ...] | None:
    if not node_index.get(NODES):
        return None
    return tuple(sorted(node_index.get(GPU_NODES, ()), key=lambda n: n.name))


def _indexes(kw: dict) -> Indexes:
    return Indexes(kw["modelservice_index"], kw["deployment_index"],
                   _Joined(kw["pod_index"], kw["worker_pod_index"]),
                   {"Deployment": kw["deployment_names"], "Service": kw["service_names"]},
                   _gpu_nodes(kw["node_index"]))


class _Joined(Mapping):
    """Two pod indexes read as one (heads and one-node pods, then group workers)."""

    def __init__(self, *indexes: Mapping) -> None:
        self._indexes = indexes

    def __getitem__(self, key: Any) -> list:
        found = [pod for index in self._indexes for pod in index.get(key, ())]
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator:
        return iter({k for index in self._indexes for k in index})

    def __len__(self) -> int:
        return len({k for index in self._indexes for k in index})


# --- the ModelService itself: one shared path ----------------------------------------------

async def _reconcile(memo: kopf.Memo, body, indexes: Indexes, *, prune: bool = True,
                     only_changes: bool = False, report: bool = False) -> None:
    """Parse, reconcile (in the thread pool), and mark the status for a refresh. ``report``
    (the create/update handler): an invalid spec gets its InvalidSpec status and Event, a
    blocked one a retry; the timer and drift repair leave both to that handler."""
    reconciler: Reconciler = memo.reconciler
    result, seconds = "error", 0.0
    try:
        try:
            ms = ModelService.from_body(body)
        except ValidationError as exc:
            result = "invalid"
            if not report:
                return
            await asyncio.get_running_loop().run_in_executor(memo.pool, _refuse, reconciler, body, exc)
            raise kopf.PermanentError(f"invalid spec: {exc}") from exc
        key = (ms.namespace, ms.name)
        status = dict(body.get("status") or {})
        pinned = PinnedImages.from_status(status)
        refused = policy.policy_problem(ms, reconciler.settings, pinned)
        if refused is not None:
            result = "refused"
            memo.refresher.forget(key)  # events of earlier children must not overwrite the refusal
            if not report:
                return
            await asyncio.get_running_loop().run_in_executor(
                memo.pool, _write_refusal, reconciler, body, refused.reason, refused.message)
            raise kopf.PermanentError(f"{refused.reason}: {refused.message}")

        # a spec change shows at once, from the apply's own answers (its new generation, not
        # Ready while a changed Deployment rolls: refresh.py); then from the watches, at once.
        # A canary tick or a drift repair waits the window, so the pods it moved show settled.
        then = (lambda moved: memo.refresher.after_apply(key, body, indexes, moved)) if report else None

        def run() -> tuple[Problem | None, float]:  # in the pool: timed there, not while queued
            started = time.perf_counter()
            _, problem = reconciler.reconcile(
                memo.refresher.store, ms, pinned_image=pinned, prune=prune, status=status,
                observed=indexes.observed(key), only_changes=only_changes,
                owners=indexes.owners(key[0], ms.metadata.uid or ""), gpu_nodes=indexes.gpus, then=then)
            return problem, time.perf_counter() - started

        problem, seconds = await asyncio.get_running_loop().run_in_executor(memo.pool, run)
        memo.refresher.touch(key, indexes, now=report)
        result = "blocked" if problem else "applied"
        # A refused variant needs no retry: a change of the spec or the nodes re-plans (node_changed)
        if problem and report and problem.reason not in VARIANT_REFUSAL_REASONS:
            raise kopf.TemporaryError(f"{problem.reason}: {problem.message}", delay=BLOCKED_RETRY_SECONDS)
    finally:
        if report:
            metrics.record_reconcile(result, seconds)


def _refuse(reconciler: Reconciler, body, exc: ValidationError) -> None:
    message = f"{'; '.join(describe_errors(exc))}. Fix the spec; nothing was created."
    _write_refusal(reconciler, body, "InvalidSpec", message)


def _write_refusal(reconciler: Reconciler, body, reason: str, message: str) -> None:
    ready = Condition(type="Ready", status="False", reason=reason, message=message,
                      observed_generation=body["metadata"].get("generation", 0),
                      last_transition_time=datetime.now(UTC).replace(microsecond=0))
    reconciler.kube.patch_status(body["metadata"]["namespace"], body["metadata"]["name"],
                                 ModelServiceStatus(conditions=[ready]).to_wire())
    post_event(reconciler.kube, body, "Warning", reason, message)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_modelservice(body, reason, memo, **kw) -> None:
    """kopf's diff base lives in memory (diffbase.py), so after a restart every ModelService
    comes as a create: one that carries a status was reconciled before, and is pruned (a
    variant removed while the operator was away), as a resume would be."""
    prune = reason != kopf.Reason.CREATE or bool(body.get("status"))
    await _reconcile(memo, body, _indexes(kw), prune=prune, report=True)


def _rollout_moving(status, **_) -> bool:
    """A canary moving, or groups (RayClusters) rolling or retiring (gpu.nodes lowered to 1):
    each step waits on pods, not on a controller of its own."""
    rollout = (status or {}).get("rollout") or {}
    grouped = any(v.get("groups") is not None for v in (status or {}).get("variants") or ())
    return (rollout.get("strategy") == "Canary" or grouped) and rollout.get("phase") == "Progressing"


@kopf.timer(GROUP, VERSION, PLURAL, interval=CANARY_TICK_SECONDS, when=_rollout_moving)
async def advance_canary(body, memo, **kw) -> None:
    """While a canary moves (scaling, pausing, retiring), re-plan it every few seconds: a
    pause ends on time and a step whose pods became available is routed. Idle ModelServices
    have no timer; a held step waits for a spec change (the update handler)."""
    await _reconcile(memo, body, _indexes(kw), only_changes=True)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def modelservice_gone(event, namespace, name, uid, body, memo, **kw) -> None:
    """Forget a deleted ModelService (its children go with the garbage collector). An event
    handler, not ``on.delete``: without a finalizer of ours kopf calls no delete handler. With
    the node cache, its PV (cluster-scoped: no owner collects it) is deleted, and the entry is
    evicted if nothing refers to it any more (cache_eviction.py)."""
    if event.get("type") != "DELETED":
        return
    memo.refresher.forget((namespace, name))
    memo.diffbase.forget(uid)
    settings: OperatorSettings = memo.settings
    if not cache_eviction.eviction_enabled(settings):
        return
    try:
        ms = ModelService.from_body(body)
    except ValidationError:
        return  # never reconciled, so nothing of the cache was made for it
    if uses_node_cache(ms):
        kube = memo.reconciler.kube
        await asyncio.get_running_loop().run_in_executor(
            memo.pool, cache_eviction.release_volume, kube, namespace, name)
        await _evict_if_unreferenced(memo, cache_key(ms.spec.model.uri), kw)


# --- children: status and drift (both in the refresher) -------------------------------

@kopf.on.event("apps", "v1", "deployments", labels=CHILD)
@kopf.on.event("", "v1", "pods", labels=CHILD)
async def child_event(namespace, labels, memo, **kw) -> None:
    """Mark the ModelService for a refresh, which also puts back a hand-edited Deployment. The
    handler never waits: kopf's per-object worker holds the whole event until it returns."""
    indexes = _indexes(kw)
    key = _owner_key(namespace, labels)
    if indexes.parent(key) is not None:
        memo.refresher.touch(key, indexes)


CACHED_POD = {**CHILD, CACHE_KEY_LABEL: kopf.PRESENT}


@kopf.on.event("", "v1", "pods", labels=CACHED_POD)
async def cached_pod_gone(event, labels, memo, **kw) -> None:
    """The last pod of a cache key gone (a ModelService deleted, or an earlier revision rolled
    away): evict the entry when nothing else refers to it."""
    if event.get("type") == "DELETED" and cache_eviction.eviction_enabled(memo.settings):
        await _evict_if_unreferenced(memo, labels[CACHE_KEY_LABEL], kw)


async def _evict_if_unreferenced(memo: kopf.Memo, key: str, kw: dict) -> None:
    pods = [pod for pods in _indexes(kw).pods.values() for pod in pods]
    if cache_eviction.referenced(key, (), pods):
        return  # a pod of the key is still indexed: no API call
    nodes = sorted(kw["node_index"].get(CACHE_NODES, ()))
    await asyncio.get_running_loop().run_in_executor(
        memo.pool, cache_eviction.evict_if_unreferenced, memo.reconciler.kube, memo.settings, key, pods, nodes)


@kopf.on.event("", "v1", "pods", labels=WORKER)
async def worker_event(namespace, labels, memo, **kw) -> None:
    indexes = _indexes(kw)
    key = (namespace or "", labels[GROUP_LABEL])
    if indexes.parent(key) is not None:
        memo.refresher.touch(key, indexes)


@kopf.on.event("", "v1", "nodes")
async def node_changed(memo, **kw) -> None:
    """When the cluster's GPUs change (a node added, removed or relabelled), re-plan every
    ModelService with a GPU-fit estimate: a refused variant may fit now, or no longer."""
    store = memo.refresher.store
    indexes = _indexes(kw)
    if indexes.gpus == store.gpus_seen:
        return  # a heartbeat or a status change: the GPUs are the same
    store.gpus_seen = indexes.gpus
    for key, applied in store.managed():
        parent = indexes.parent(key)
        if applied.plan.fits and parent is not None:
            await _reconcile(memo, parent, indexes)
