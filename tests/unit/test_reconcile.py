"""The pure half of the reconcile: image pinning, ownership, stale children, the plan."""

from __future__ import annotations

import pytest
from kubemaas_operator.api import ModelService
from kubemaas_operator.builders import (
    FOLLOW_OPERATOR,
    IMAGE_POLICY_ANNOTATION,
    choose_runtime_image,
)
from kubemaas_operator.builders.image import PinnedImages
from kubemaas_operator.kube import Conflict
from kubemaas_operator.reconcile import (
    Reconciler,
    decide,
    drifted,
    foreign_owner,
    stale_children,
    status_for,
)
from kubemaas_operator.settings import OperatorSettings
from kubemaas_operator.store import Store

SETTINGS = OperatorSettings(runtime_image="registry.example/runtime:2.0")
UID = "11111111-2222-3333-4444-555555555555"


def _ms(image: str = "", annotations: dict | None = None, replicas: int = 5) -> ModelService:
    return ModelService.from_body({
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
        "metadata": {"name": "m", "namespace": "ns", "uid": UID, "generation": 4,
                     "annotations": annotations or {}},
        "spec": {
            "model": {"uri": "pvc://models/minilm", "format": "transformers", "task": "feature-extraction"},
            "replicas": replicas,
            "runtime": {"image": image} if image else {},
            "variants": [{"name": "a", "quantization": "none", "weight": 80},
                         {"name": "b", "quantization": "bf16", "weight": 20}],
        },
    })


@pytest.mark.parametrize(
    ("spec_image", "pinned", "annotations", "expected"),
    [
        ("", None, {}, "registry.example/runtime:2.0"),          # nothing pinned: the default
        ("", "old/runtime:1.0", {}, "old/runtime:1.0"),          # operator upgrade restarts nothing
        ("mine:3", "old/runtime:1.0", {}, "mine:3"),             # the spec decides
        ("", "old/runtime:1.0", {IMAGE_POLICY_ANNOTATION: FOLLOW_OPERATOR},
         "registry.example/runtime:2.0"),                        # explicit policy
    ],
)
def test_runtime_image_is_pinned(spec_image, pinned, annotations, expected) -> None:
    assert choose_runtime_image(_ms(spec_image, annotations), pinned, SETTINGS.runtime_image) == expected


def test_plan_splits_replicas_and_names_children() -> None:
    plan = decide(_ms(), SETTINGS, pinned_image=PinnedImages(builtin="old/runtime:1.0"))
    assert plan.key == ("ns", "m") and plan.generation == 4
    assert [(v.name, v.replicas, v.deployment) for v in plan.variants] == [("a", 4, "m-a"), ("b", 1, "m-b")]
    deployments = [c for c in plan.children if c["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"m-a", "m-b"}
    for dep in deployments:
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "old/runtime:1.0"
    assert plan.url.startswith("http://m.ns.svc.")


def _obj(kind: str, name: str, owner_uid: str | None, labelled: bool = True) -> dict:
    meta: dict = {"name": name, "uid": f"uid-{name}"}
    if owner_uid:
        meta["ownerReferences"] = [{"kind": "ModelService", "name": "x", "uid": owner_uid, "controller": True}]
    if labelled:
        meta["labels"] = {"kubemaas.io/modelservice": "m"}
    return {"kind": kind, "metadata": meta}


def test_foreign_owner() -> None:
    assert foreign_owner(None, UID) is None
    assert foreign_owner(_obj("Deployment", "m-a", UID), UID) is None
    assert "ModelService x" in foreign_owner(_obj("Deployment", "m-a", "someone-else"), UID)
    assert foreign_owner(_obj("Service", "m", None, labelled=False), UID)


def test_stale_children_are_only_our_undesired_ones() -> None:
    desired = tuple(decide(_ms(), SETTINGS, None).children)
    observed = [
        _obj("Deployment", "m-a", UID),               # desired: kept
        _obj("Deployment", "m-old", UID),             # a removed variant: stale
        _obj("HorizontalPodAutoscaler", "m", UID),    # autoscaling dropped: stale
        _obj("Deployment", "m-zzz", "someone-else"),  # not ours: never touched
    ]
    stale = stale_children(desired, observed, UID)
    assert {(o["kind"], o["metadata"]["name"]) for o in stale} == {
        ("Deployment", "m-old"), ("HorizontalPodAutoscaler", "m")}


class _Kube:
    """A KubeClient answering from a dict of existing objects, recording the calls."""

    def __init__(self, existing: dict | None = None, conflicts: set | None = None) -> None:
        self.existing = existing or {}
        self.conflicts = conflicts or set()
        self.calls: list[tuple] = []

    def apply(self, obj, force=False):
        key = (obj["kind"], obj["metadata"]["name"])
        self.calls.append(("apply", *key, force))
        if key in self.conflicts and not force:
            raise Conflict(409, "conflict with kubectl-edit")
        return {**obj, "metadata": {**obj["metadata"], "generation": 1}}

    def get(self, kind, namespace, name):
        self.calls.append(("get", kind, name))
        return self.existing.get((kind, name))

    def list(self, kind, namespace, selector):
        return []

    def patch_status(self, namespace, name, status):
        self.calls.append(("patch_status", name))


def test_a_reconcile_reads_no_child_when_nothing_conflicts() -> None:
    kube = _Kube()
    plan, problem = Reconciler(kube, SETTINGS).reconcile(Store(), _ms(), None, prune=False)
    assert problem is None
    assert [c[0] for c in kube.calls] == ["apply"] * len(plan.children)
    assert not any(force for *_, force in kube.calls)


def test_a_hand_edited_child_is_read_once_then_applied_with_force() -> None:
    kube = _Kube(existing={("Deployment", "m-a"): _obj("Deployment", "m-a", UID)},
                 conflicts={("Deployment", "m-a")})
    _, problem = Reconciler(kube, SETTINGS).reconcile(Store(), _ms(), None, prune=False)
    assert problem is None
    calls = [c for c in kube.calls if c[1:3] == ("Deployment", "m-a")]
    assert calls == [("apply", "Deployment", "m-a", False), ("get", "Deployment", "m-a"),
                     ("apply", "Deployment", "m-a", True)]
    assert [c for c in kube.calls if c[0] == "get"] == [("get", "Deployment", "m-a")]  # the only read


def test_an_object_of_another_manager_is_a_name_conflict_and_is_not_overwritten() -> None:
    kube = _Kube(existing={("Service", "m"): _obj("Service", "m", None, labelled=False)},
                 conflicts={("Service", "m")})
    _, problem = Reconciler(kube, SETTINGS).reconcile(Store(), _ms(), None, prune=False)
    assert problem is not None and problem.reason == "NameConflict" and "Service m" in problem.message
    assert ("apply", "Service", "m", True) not in kube.calls


def test_a_name_another_modelservice_holds_is_a_conflict_without_a_write() -> None:
    kube = _Kube()
    owners = lambda kind, name: "ModelService x" if (kind, name) == ("Deployment", "m-a") else None
    _, problem = Reconciler(kube, SETTINGS).reconcile(Store(), _ms(), None, prune=False, owners=owners)
    assert problem is not None and problem.reason == "NameConflict" and "ModelService x" in problem.message
    assert ("apply", "Deployment", "m-a", False) not in kube.calls


def test_the_status_written_is_the_record_only_until_the_watch_delivers_it() -> None:
    store = Store()
    key, old, new = ("ns", "m"), {"replicas": 0}, {"replicas": 1}
    assert store.last_status(key, old) == old  # nothing written: the object's
    store.wrote(key, new)
    assert store.last_status(key, old) == new  # the watch lags: ours
    assert store.last_status(key, new) == new  # delivered: the object's again
    assert store.entry(key).written is None
    assert store.last_status(key, {"replicas": 2}) == {"replicas": 2}  # a later writer wins
    assert store.last_status(key, None) is None


def test_the_applier_keeps_nothing_and_forgetting_a_key_drops_all_of_its_state() -> None:
    """The reconciler holds no state of its own: what an apply did goes into the store it is
    handed, and one forget drops the apply, the status written and the lock together."""
    reconciler, store, other = Reconciler(_Kube(), SETTINGS), Store(), Store()
    ms = _ms()
    key = (ms.namespace, ms.name)
    reconciler.reconcile(store, ms, None, prune=False)
    store.wrote(key, {"replicas": 1})
    assert store.applied(key) is not None and [k for k, _ in store.managed()] == [key]
    assert other.applied(key) is None and other.managed() == []  # nothing leaked into the applier
    lock = store.lock(key)
    store.forget(key)
    assert store.applied(key) is None and store.managed() == [] and store.last_status(key, None) is None
    assert store.lock(key) is not lock


def test_a_deployment_is_drifted_only_past_the_generation_our_apply_got() -> None:
    reconciler, store = Reconciler(_Kube(), SETTINGS), Store()
    ms = _ms()
    plan, _ = reconciler.reconcile(store, ms, None, prune=False)
    applied = store.applied((ms.namespace, ms.name))
    name = next(c["metadata"]["name"] for c in plan.children if c["kind"] == "Deployment")

    def indexed(dep: str, generation: int) -> dict:
        return {"metadata": {"name": dep, "generation": generation}}

    assert drifted(applied, [indexed(name, 1)]) == []  # the generation our apply got (the fake's 1)
    assert drifted(applied, [indexed(name, 2)]) == [(name, 2)]  # someone changed the spec since
    assert drifted(applied, [indexed("not-ours", 9)]) == []
    assert drifted(store.applied(("ns", "unknown")), [indexed(name, 9)]) == []


class _VersionedKube(_Kube):
    """Answers an apply as the API server does: the generation moves when the spec changed."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: dict[tuple[str, str], dict] = {}

    def apply(self, obj, force=False):
        key = (obj["kind"], obj["metadata"]["name"])
        old = self.stored.get(key)
        generation = (old["metadata"]["generation"] + (old["spec"] != obj.get("spec"))) if old else 1
        self.stored[key] = {**obj, "metadata": {**obj["metadata"], "generation": generation}}
        return self.stored[key]


def test_then_runs_under_the_lock_with_only_the_deployments_the_apply_moved() -> None:
    reconciler, store = Reconciler(_VersionedKube(), SETTINGS), Store()
    seen: list[tuple[bool, dict]] = []
    then = lambda moved: seen.append((store.lock(("ns", "m")).locked(), moved))

    plan, _ = reconciler.reconcile(store, _ms(replicas=2), None, prune=False, then=then)
    names = {c["metadata"]["name"] for c in plan.children if c["kind"] == "Deployment"}
    reconciler.reconcile(store, _ms(replicas=2), None, prune=False, then=then)  # the same spec again
    reconciler.reconcile(store, _ms(image="example.com/other:2", replicas=2), None, prune=False, then=then)

    assert all(locked for locked, _ in seen)
    assert set(seen[0][1]) == names and all(b["metadata"]["generation"] == 1 for b in seen[0][1].values())
    assert seen[1][1] == {}  # nothing changed: nothing moved
    assert set(seen[2][1]) == names and all(b["metadata"]["generation"] == 2 for b in seen[2][1].values())


def test_status_of_a_node_cached_model_reports_each_node_and_the_plain_one_none() -> None:
    """spec.model.cache node: status.cache and cacheSummary from the pods' fetch reports
    (cache_status.py holds the cases); without the cache neither is written."""
    import json

    from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL, cache_key
    from kubemaas_operator.builders.naming import FETCH_CONTAINER

    uri = "hf://org/m@abc123"
    body = _ms().model_dump(mode="json", by_alias=True, exclude_none=True)
    body["spec"]["model"] = {"uri": uri, "format": "transformers", "task": "feature-extraction", "cache": "node"}
    cached = ModelService.from_body(body)
    store = Store()
    plan, _ = Reconciler(_Kube(), SETTINGS).reconcile(store, cached, None, prune=False)
    assert plan.cache_key == cache_key(uri)
    line = "KubemaasCache: " + json.dumps({"bytes": 12, "cache": "filled", "key": plan.cache_key,
                                           "revision": "abc123", "uri": uri})
    pod = {"metadata": {"labels": {CACHE_KEY_LABEL: plan.cache_key}}, "spec": {"nodeName": "n1"},
           "status": {"initContainerStatuses": [{"name": FETCH_CONTAINER, "state": {"terminated": {
               "exitCode": 0, "message": line, "finishedAt": "2026-01-01T00:00:00Z"}}}]}}
    waiting = {**pod, "spec": {"nodeName": "n2"}, "status": {}}
    status = status_for(store.applied(("ns", "m")), ("ns", "m"), [], [pod, waiting], None)
    assert status is not None and status["cacheSummary"] == "1/2 nodes"
    assert [(n["node"], n["ready"], n["bytes"]) for n in status["cache"]] == [("n1", True, 12), ("n2", False, 0)]

    plain = Store()
    Reconciler(_Kube(), SETTINGS).reconcile(plain, _ms(), None, prune=False)
    status = status_for(plain.applied(("ns", "m")), ("ns", "m"), [], [pod], None)
    assert status is not None and "cache" not in status and "cacheSummary" not in status


class _ReleasedVolumeKube(_Kube):
    """The API server's answer to the cache PV's apply: Released, bound to a gone claim."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def apply(self, obj, force=False):
        out = super().apply(obj, force)
        if obj["kind"] == "PersistentVolume":
            spec = {**obj["spec"], "claimRef": {**obj["spec"]["claimRef"], "uid": "old-claim"}}
            out = {**out, "spec": spec, "status": {"phase": self.phase}}
        return out

    def json_patch(self, kind, namespace, name, ops):
        self.calls.append(("json_patch", kind, name, tuple(op["op"] for op in ops)))
        return True


@pytest.mark.parametrize(("phase", "reopened"), [("Released", True), ("Bound", False)])
def test_a_modelservice_created_again_under_its_name_reopens_the_released_cache_volume(
        phase: str, reopened: bool) -> None:
    """The PV of a deleted ModelService of this name is kept Released until its eviction
    succeeded; the new one's claim can bind it only once the gone claim's uid is removed."""
    body = _ms().model_dump(mode="json", by_alias=True, exclude_none=True)
    body["spec"]["model"] = {"uri": "hf://org/m@abc123", "format": "transformers", "task": "feature-extraction",
                             "cache": "node"}
    kube = _ReleasedVolumeKube(phase)
    Reconciler(kube, SETTINGS.model_copy(update={"model_cache": True})).reconcile(
        Store(), ModelService.from_body(body), None, prune=False)
    patches = [c for c in kube.calls if c[0] == "json_patch"]
    assert patches == ([("json_patch", "PersistentVolume", "kubemaas-cache-ns-m", ("test", "remove"))]
                       if reopened else [])
