"""The status refresher: the events of one window give one computation and at most one write."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from kubemaas_operator.refresh import Indexes, StatusRefresher

KEY = ("ns", "m")


class _Reconciler:
    """The refresher's kube (patch_status) and its status and drift functions: counts status
    computations; the status is whatever `ready` says now."""

    def __init__(self) -> None:
        self.computed = 0
        self.writes: list[dict] = []
        self.ready = 0
        self.gate = threading.Event()
        self.gate.set()
        self.drift: list = []  # what drifted() reports, until a repair clears it (when it can)

    def status_for(self, applied, key, deployments, pods, previous):
        ready = self.ready  # what the indexes said when the refresh began
        self.gate.wait(5)
        self.computed += 1
        status = {"readyReplicas": ready,
                  "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                  "reason": "R", "message": ""}]}
        return None if previous == status else status

    def patch_status(self, namespace, name, status):
        self.writes.append(status)

    def drifted(self, applied, deployments):
        return list(self.drift)


def _indexes() -> Indexes:
    return Indexes({KEY: [{"metadata": {"name": "m"}, "status": {}}]}, {}, {}, {})


def _run(scenario, repair=None) -> tuple[_Reconciler, list]:
    reconciler, posted = _Reconciler(), []
    with ThreadPoolExecutor(2) as pool:
        refresher = StatusRefresher(reconciler, pool, window=0.05,  # type: ignore[arg-type]
                                    post=lambda parent, before, after: posted.append((before, after)),
                                    repair=repair, status=reconciler.status_for, drift=reconciler.drifted)
        asyncio.run(scenario(refresher, reconciler))
    return reconciler, posted


def test_a_burst_of_events_is_one_computation_and_one_write() -> None:
    async def scenario(refresher, reconciler):
        for _ in range(20):
            refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.3)

    reconciler, posted = _run(scenario)
    assert reconciler.computed == 1 and len(reconciler.writes) == 1
    assert len(posted) == 1  # Ready appeared: one Event


def test_an_event_during_a_refresh_gives_exactly_one_more() -> None:
    async def scenario(refresher, reconciler):
        reconciler.gate.clear()  # the first refresh blocks in the pool
        refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.1)
        reconciler.ready = 1
        for _ in range(5):
            refresher.touch(KEY, _indexes())
        reconciler.gate.set()
        await asyncio.sleep(0.4)

    reconciler, _ = _run(scenario)
    assert reconciler.computed == 2
    assert [w["readyReplicas"] for w in reconciler.writes] == [0, 1]


def test_an_unchanged_status_is_not_written_again() -> None:
    async def scenario(refresher, reconciler):
        refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.2)
        refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.2)

    reconciler, posted = _run(scenario)
    assert reconciler.computed == 2 and len(reconciler.writes) == 1 and len(posted) == 1


def test_a_forgotten_modelservice_is_not_refreshed() -> None:
    async def scenario(refresher, reconciler):
        refresher.touch(KEY, _indexes())
        refresher.forget(KEY)
        await asyncio.sleep(0.2)

    reconciler, _ = _run(scenario)
    assert reconciler.computed == 0


def test_a_reconcile_is_refreshed_at_once() -> None:
    async def scenario(refresher, reconciler):
        refresher._window = 10  # an event would wait that long
        refresher.touch(KEY, _indexes(), now=True)
        await asyncio.sleep(0.2)

    reconciler, _ = _run(scenario)
    assert reconciler.computed == 1


def test_a_reconcile_cuts_short_the_window_a_child_event_opened() -> None:
    """A Deployment's event often arrives before the reconcile that applied it returns: the
    reconcile's touch must still show its new generation at once."""
    async def scenario(refresher, reconciler):
        refresher._window = 10
        refresher.touch(KEY, _indexes())            # the child's event: waits the window
        await asyncio.sleep(0.05)
        refresher.touch(KEY, _indexes(), now=True)  # the reconcile: at once
        await asyncio.sleep(0.2)

    reconciler, _ = _run(scenario)
    assert reconciler.computed == 1


def test_a_hand_edit_is_repaired_before_the_status_is_written() -> None:
    repairs = []

    async def scenario(refresher, reconciler):
        reconciler.drift = [("m-a", 2)]

        async def repair(parent, indexes):
            repairs.append(parent["metadata"]["name"])
            reconciler.drift = []  # the apply put it back
            refresher.touch(KEY, indexes)  # as the reconcile does

        refresher._repair = repair
        refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.4)

    reconciler, _ = _run(scenario)
    assert repairs == ["m"]
    assert reconciler.computed == 1 and len(reconciler.writes) == 1  # the status after the repair


def test_an_edit_the_repair_cannot_put_back_is_repaired_once_per_run_not_in_a_loop() -> None:
    repairs = []

    async def scenario(refresher, reconciler):
        reconciler.drift = [("m-a", 2)]  # stays: the repair's apply was blocked

        async def repair(parent, indexes):
            repairs.append(1)
            refresher.touch(KEY, indexes)

        refresher._repair = repair
        refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.4)
        reconciler.drift = [("m-a", 3)]  # edited again: a new generation is repaired again
        refresher.touch(KEY, _indexes())
        await asyncio.sleep(0.4)

    reconciler, _ = _run(scenario)
    assert len(repairs) == 2
    assert len(reconciler.writes) >= 1  # the status is still written


def test_after_apply_computes_from_the_apply_answer_and_posts_before_the_lock_is_let_go() -> None:
    """A spec change's status comes from what its apply answered (a new template, not rolled
    out), whatever the watches already hold; its Event is posted while the lock is still held,
    so a refresh that writes next posts after it."""
    seen: dict = {}

    class Recording(_Reconciler):
        def status_for(self, applied, key, deployments, pods, previous):
            seen["deployments"] = {d["metadata"]["name"]: d for d in deployments}
            return super().status_for(applied, key, deployments, pods, previous)

    reconciler, posted = Recording(), []
    refresher = StatusRefresher(reconciler, None,  # type: ignore[arg-type]
                                post=lambda parent, before, after: posted.append(refresher.store.lock(KEY).locked()),
                                status=reconciler.status_for)
    rolled = {"metadata": {"name": "m-a", "generation": 2, "labels": {}}, "spec": {"replicas": 1},
              "status": {"observedGeneration": 2, "updatedReplicas": 1, "replicas": 1}}
    untouched = {"metadata": {"name": "m-b", "generation": 1, "labels": {}}, "spec": {"replicas": 1},
                 "status": {"observedGeneration": 1}}
    answer = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "m-a", "generation": 2, "managedFields": [{}], "labels": {"x": "y"}},
              "spec": {"replicas": 1, "template": {}}, "status": {"observedGeneration": 1}}
    indexes = Indexes({KEY: [{"metadata": {"name": "m"}, "status": {}}]}, {KEY: [rolled, untouched]}, {}, {})

    with refresher.store.lock(KEY):
        refresher.after_apply(KEY, indexes.parent(KEY), indexes, {"m-a": answer})

    assert seen["deployments"]["m-a"] == {"metadata": {"name": "m-a", "generation": 2, "labels": {"x": "y"}},
                                          "spec": {"replicas": 1}, "status": {"observedGeneration": 1}}
    assert seen["deployments"]["m-b"] is untouched
    assert len(reconciler.writes) == 1 and posted == [True]
