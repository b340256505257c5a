"""Status follows the watches: at most one refresh per ModelService in flight, one write per change.

A child's event only marks its ModelService; after a short window the refresh, in the pool and
under the ModelService's lock, first checks its indexed Deployments for a hand edit (a
generation above the one our apply got: the ModelService is reconciled again, ``repair``, and
refreshed after), else computes the status once from kopf's indexes (whatever happened in the
window: a Deployment's status, its pods starting) and writes it when it differs from the status
last written, posting an Event when the Ready condition moved (from the pool, with our client:
events.py says why not kopf's poster). Events that arrive while a refresh runs fold into one more.

A spec change does not wait for the watches: under the same lock as its apply, the reconcile
writes the status it sees in the apply's own answers (:meth:`StatusRefresher.after_apply`), so
a changed Deployment shows not rolled out first even when its pods are quicker than the
reconcile. Each write posts its Event before the lock is let go, so Events follow the order of
the statuses they report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from kubemaas_operator.events import post_event
from kubemaas_operator.kube import KubeClient
from kubemaas_operator.observed import ObservedDeployment
from kubemaas_operator.reconcile import Applied, Owners, drifted, status_for
from kubemaas_operator.store import Key, Store

log = logging.getLogger(__name__)
WINDOW_SECONDS = 0.5
RETRY_SECONDS = 5
MAX_FAILURES = 12  # a minute of a failing API server; the next event starts again


def deployment_view(body: Mapping[str, Any]) -> dict:
    """What status is computed from, of one Deployment: its name, generation, labels, replicas
    and status (the watch's index keeps this much of each; an apply's answer is cut the same)."""
    meta = body["metadata"]
    return {"metadata": {"name": meta["name"], "generation": meta.get("generation", 0),
                         "labels": dict(meta.get("labels") or {})},
            "spec": {"replicas": (body.get("spec") or {}).get("replicas", 1)},
            "status": dict(body.get("status") or {})}


@dataclass(frozen=True)
class Indexes:
    """kopf's indexes (live views), as the handlers receive them."""

    modelservices: Mapping[Any, Any]
    deployments: Mapping[Any, Any]
    pods: Mapping[Any, Any]
    names: Mapping[str, Mapping[Any, Any]]  # kind -> (namespace, name) -> controller (uid, kind, name)
    gpus: tuple[Any, ...] | None = None  # the cluster's GPU nodes (None: nodes not readable)

    def parent(self, key: Key) -> Any:
        for body in self.modelservices.get(key, ()):
            return body
        return None

    def observed(self, key: Key) -> list[ObservedDeployment]:
        found = (ObservedDeployment.from_object(d) for d in self.deployments.get(key, ()))
        return [d for d in found if d is not None]

    def owners(self, namespace: str, uid: str) -> Owners:
        """Who, other than the ModelService ``uid``, controls a child's name in ``namespace``."""
        def holder(kind: str, name: str) -> str | None:
            for owner_uid, owner_kind, owner_name in self.names.get(kind, {}).get((namespace, name), ()):
                if owner_uid and owner_uid != uid:
                    return f"{owner_kind} {owner_name}"
            return None
        return holder


StatusOf = Callable[[Applied | None, Key, list[dict], list[dict], dict | None], dict | None]
DriftOf = Callable[[Applied | None, list[dict]], list[tuple[str, int]]]


class StatusRefresher:
    """Owns the store (store.py): each ModelService's lock, its last apply and the status last
    written. ``status`` and ``drift`` compute from an entry (reconcile.py's, unless a test gives
    its own)."""

    def __init__(self, kube: KubeClient, pool: Executor, window: float = WINDOW_SECONDS,
                 post: Callable[[Any, list[dict], list[dict]], None] | None = None,
                 repair: Callable[[Any, Indexes], Awaitable[None]] | None = None,
                 status: StatusOf = status_for, drift: DriftOf = drifted) -> None:
        self.store = Store()
        self._kube = kube
        self._status = status
        self._drift = drift
        self._repair = repair  # reconcile a ModelService (its parent body) whose child was edited by hand
        self._post = post or (lambda parent, before, after: post_transition(kube, parent, before, after))
        self._pool = pool
        self._window = window
        self._running: dict[Key, asyncio.Task] = {}
        self._again: set[Key] = set()  # touched while its refresh ran: one more
        self._urgent: set[Key] = set()  # a reconcile: no window
        self._wake: dict[Key, asyncio.Event] = {}

    def touch(self, key: Key, indexes: Indexes, now: bool = False) -> None:
        """Refresh ``key``'s status after the window, or at once (``now``: a reconcile, whose
        new generation must show even when its pods are quicker than the window). Called from
        kopf's handlers, on the event loop."""
        if now:
            self._urgent.add(key)
        if key in self._running:
            self._again.add(key)
            wake = self._wake.get(key)
            if now and wake is not None:
                wake.set()  # cut the window short
            return
        self._running[key] = asyncio.create_task(self._run(key, indexes))

    def forget(self, key: Key) -> None:
        """Stop refreshing ``key`` and drop everything this process kept of it."""
        task = self._running.pop(key, None)
        if task is not None:
            task.cancel()
        self._again.discard(key)
        self._urgent.discard(key)
        self.store.forget(key)

    async def _wait(self, key: Key, seconds: float) -> None:
        """The window, ended early by a reconcile's touch."""
        if key in self._urgent:
            return
        wake = self._wake[key] = asyncio.Event()
        try:
            await asyncio.wait_for(wake.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._wake.pop(key, None)

    async def _run(self, key: Key, indexes: Indexes) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        repaired: set[tuple[str, int]] = set()  # edits repaired in this run: one that stays must not spin
        try:
            while True:
                await self._wait(key, self._window)
                self._urgent.discard(key)
                self._again.discard(key)
                parent = indexes.parent(key)
                if parent is None:
                    return
                try:
                    drifted = await loop.run_in_executor(
                        self._pool, self._refresh, key, parent, indexes, frozenset(repaired))
                    failures = 0
                    if drifted and self._repair is not None:
                        log.info("Deployment %s/%s was changed by hand; putting it back", key[0], drifted[0][0])
                        repaired.update(drifted)
                        self._again.add(key)  # then the status, in one more pass
                        await self._repair(parent, indexes)
                except Exception:
                    failures += 1
                    log.exception("writing the status of %s/%s failed (%d)", *key, failures)
                    if failures < MAX_FAILURES:  # an API server away for a while: try again
                        self._again.add(key)
                        await asyncio.sleep(RETRY_SECONDS)
                if key not in self._again:
                    return
        finally:
            if self._running.get(key) is asyncio.current_task():
                del self._running[key]

    def _refresh(self, key: Key, parent: Any, indexes: Indexes, repaired: frozenset = frozenset(),
                 ) -> list[tuple[str, int]]:
        """In the pool: the Deployments edited by hand, as (name, generation), other than those
        this run already repaired (then nothing is written: the repair comes first); else
        compute and write the status, and its Event."""
        with self.store.lock(key):
            deployments = list(indexes.deployments.get(key, ()))
            edited = [d for d in self._drift(self.store.applied(key), deployments) if d not in repaired] \
                if self._repair is not None else []
            if edited:
                return edited
            self._write(key, parent, deployments, list(indexes.pods.get(key, ())))
        return []

    def after_apply(self, key: Key, parent: Any, indexes: Indexes, applied: Mapping[str, dict]) -> None:
        """In the pool, under the lock of the reconcile that just applied ``applied`` (the
        Deployments whose generation it moved, as the API server answered the apply): write
        the status those answers show, with the other Deployments as indexed. A new template
        is not rolled out in its apply's answer, so the change always shows as not Ready
        first; the refresh that follows reads the watches."""
        views = {d["metadata"]["name"]: d for d in indexes.deployments.get(key, ())}
        views.update((name, deployment_view(body)) for name, body in applied.items())
        self._write(key, parent, list(views.values()), list(indexes.pods.get(key, ())))

    def _write(self, key: Key, parent: Any, deployments: list[dict], pods: list[dict]) -> None:
        """Compute, and write when it changed, with the Event of a Ready transition. Under the
        lock: the next write, and its Event, wait for this one's."""
        previous = self.store.last_status(key, parent.get("status"))
        status = self._status(self.store.applied(key), key, deployments, pods, previous)
        if status is None:
            return
        self._kube.patch_status(key[0], key[1], status)
        self.store.wrote(key, status)
        self._post(parent, (previous or {}).get("conditions") or [], status["conditions"])


def post_transition(kube: KubeClient, parent: Any, before: list[dict], after: list[dict]) -> None:
    """An Event when the Ready condition's status or reason changed."""
    old = {c["type"]: c for c in before}
    ready = next(c for c in after if c["type"] == "Ready")
    prev = old.get("Ready")
    if prev and (prev["status"], prev.get("reason")) == (ready["status"], ready["reason"]):
        return
    kind = "Normal" if ready["status"] == "True" or ready["reason"] == "WaitingForReplicas" else "Warning"
    post_event(kube, parent, kind, ready["reason"], ready["message"])
