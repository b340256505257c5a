"""Eviction of node-cache entries: who still refers to a key, and the Jobs that remove it."""

from __future__ import annotations

import time

import pytest
from kubemaas_operator.builders.cache_eviction import (
    EVICT_CLAIM,
    build_evict_claim,
    build_evict_job,
    build_evict_volume,
)
from kubemaas_operator.builders.model_cache import (
    CACHE_KEY_LABEL,
    cache_key,
    reopen_released_volume,
)
from kubemaas_operator.cache_eviction import (
    Eviction,
    evict_if_unreferenced,
    eviction_enabled,
    eviction_objects,
    job_state,
    plan_evictions,
    referenced,
    retry_keys,
    sweep,
    sweep_keys,
    volume_refers,
)
from kubemaas_operator.kube import ApiError
from kubemaas_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(model_cache=True, model_cache_eviction_namespace="kubemaas-system",
                            runtime_image="registry.example/runtime:2.0")
KEY = cache_key("hf://org/m@abc123")
OTHER = cache_key("hf://org/m@def456")


def _pv(key: str, phase: str = "Bound", deleting: bool = False, namespace: str = "ns") -> dict:
    meta: dict = {"name": f"kubemaas-cache-{namespace}-{key}",
                  "labels": {CACHE_KEY_LABEL: key, "kubemaas.io/modelservice-namespace": namespace}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def _pod(key: str) -> dict:
    return {"metadata": {"labels": {"kubemaas.io/modelservice": "m", CACHE_KEY_LABEL: key}}}


@pytest.mark.parametrize(("volumes", "pods", "expected"), [
    ([_pv(KEY)], [], True),                          # a ModelService uses it (any namespace)
    ([_pv(KEY, phase="Available")], [], True),       # its claim not bound yet
    ([_pv(KEY, deleting=True)], [], False),          # the deleted ModelService's own PV
    ([_pv(KEY, phase="Released")], [], False),       # a claim deleted long ago
    ([_pv(OTHER)], [], False),                       # another revision's
    ([], [_pod(KEY)], True),                         # an earlier revision's pod still there
    ([], [_pod(OTHER)], False),
    ([_pv(KEY, deleting=True)], [_pod(KEY)], True),  # the garbage collector not done with its pods
    ([], [], False),
], ids=["used", "unbound", "pv-deleting", "pv-released", "other-key-pv", "pod", "other-key-pod",
        "pods-going", "nothing"])
def test_referenced(volumes: list, pods: list, expected: bool) -> None:
    assert referenced(KEY, volumes, pods) is expected


def test_the_jobs_volume_refers_to_no_entry_and_is_bound_to_their_claim() -> None:
    volume, claim = build_evict_volume(SETTINGS), build_evict_claim(SETTINGS)
    assert CACHE_KEY_LABEL not in volume["metadata"]["labels"] and not volume_refers(volume, KEY)
    assert volume["spec"]["local"] == {"path": SETTINGS.model_cache_path} and "hostPath" not in volume["spec"]
    assert volume["spec"]["claimRef"]["namespace"] == "kubemaas-system"
    assert volume["spec"]["claimRef"]["name"] == claim["metadata"]["name"] == EVICT_CLAIM
    assert claim["metadata"]["namespace"] == "kubemaas-system"
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    (term,) = volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": SETTINGS.model_cache_node_label, "operator": "In", "values": ["true"]}]


def test_one_job_per_node_pinned_to_it_running_cache_evict_with_least_privilege() -> None:
    objs = eviction_objects(KEY, ["node-b", "node-a"], 1_700_000_000.4, SETTINGS)
    assert [o["kind"] for o in objs] == ["PersistentVolume", "PersistentVolumeClaim", "Job", "Job"]
    jobs = objs[2:]
    assert [j["metadata"]["annotations"]["kubemaas.io/node"] for j in jobs] == ["node-a", "node-b"]
    assert len({j["metadata"]["name"] for j in jobs}) == 2
    job = jobs[0]
    assert job["metadata"]["namespace"] == "kubemaas-system" and job["metadata"]["labels"][CACHE_KEY_LABEL] == KEY
    pod = job["spec"]["template"]["spec"]
    # its pod is no cached pod: the cached pods' affinity (to the key label) does not draw to it
    assert CACHE_KEY_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["template"]["metadata"]["labels"]["kubemaas.io/model-cache-evict-key"] == KEY
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}]}
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/runtime:2.0"
    assert container["args"] == ["cache-evict", "--root", "/cache", "--key", KEY, "--used-before", "1700000000"]
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": EVICT_CLAIM}}]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 65532
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["activeDeadlineSeconds"] > 0
    assert eviction_objects(KEY, [], 1.0, SETTINGS) == []


def test_a_later_decision_is_a_new_job() -> None:
    """A Job's template is immutable, and its --used-before differs: a new name."""
    first, again = (build_evict_job(KEY, "n", t, SETTINGS)["metadata"]["name"] for t in (1000.0, 2000.0))
    assert first != again and len(first) <= 63


def test_the_jobs_args_are_the_runtimes_own_command() -> None:
    from kubemaas_runtime.__main__ import build_parser

    args = build_parser().parse_args(build_evict_job(KEY, "n", 1234.0, SETTINGS)["spec"]["template"]["spec"]
                                     ["containers"][0]["args"])
    assert (args.command, args.root, args.key, args.used_before) == ("cache-evict", "/cache", KEY, 1234.0)


@pytest.mark.parametrize(("cache", "namespace", "enabled"), [(True, "ns", True), (True, "", False), (False, "ns", False)])
def test_eviction_needs_the_cache_switch_and_a_namespace(cache: bool, namespace: str, enabled: bool) -> None:
    assert eviction_enabled(OperatorSettings(model_cache=cache, model_cache_eviction_namespace=namespace)) is enabled


class _Kube:
    def __init__(self, volumes: list[dict]) -> None:
        self.volumes = volumes
        self.calls: list[tuple] = []

    def list(self, kind, namespace, selector):
        self.calls.append(("list", kind, selector))
        return [v for v in self.volumes if f"{CACHE_KEY_LABEL}={v['metadata']['labels'][CACHE_KEY_LABEL]}" == selector]

    def apply(self, obj, force=False):
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return obj


def test_evict_writes_the_jobs_only_when_no_volume_or_pod_refers() -> None:
    kube = _Kube([_pv(OTHER)])
    jobs = evict_if_unreferenced(kube, SETTINGS, KEY, [_pod(OTHER)], ["n1", "n2"])
    assert len(jobs) == 2
    assert [c[:2] for c in kube.calls] == [("list", "PersistentVolume"), ("apply", "PersistentVolume"),
                                           ("apply", "PersistentVolumeClaim"), ("apply", "Job"), ("apply", "Job")]
    used = _Kube([_pv(KEY)])
    assert evict_if_unreferenced(used, SETTINGS, KEY, [], ["n1"]) == []
    assert [c[0] for c in used.calls] == ["list"]
    pods = _Kube([])
    assert evict_if_unreferenced(pods, SETTINGS, KEY, [_pod(KEY)], ["n1"]) == []
    assert pods.calls == []  # the pod index answers: no API call


def _job(key: str, node: str, state: str = "running", at: float = 1000.0) -> dict:
    """An eviction Job as the API holds it: running, or finished (its Complete or Failed condition)."""
    job = build_evict_job(key, node, at, SETTINGS)
    job["metadata"]["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    if state != "running":
        kind = {"succeeded": "Complete", "failed": "Failed"}[state]
        job["status"] = {"conditions": [{"type": "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget",
                                         "status": "True"}, {"type": kind, "status": "True"}]}
    return job


def _name(job: dict) -> str:
    return job["metadata"]["name"]


RELEASED = _pv(KEY, phase="Released")
R = RELEASED["metadata"]["name"]
OK1, OK2 = _job(KEY, "n1", "succeeded"), _job(KEY, "n2", "succeeded")
FAIL1, FAIL2 = _job(KEY, "n1", "failed"), _job(KEY, "n2", "failed")
LATER_OK1 = _job(KEY, "n1", "succeeded", at=2000.0)
LATER_RUN1 = _job(KEY, "n1", "running", at=2000.0)
LATER_FAIL1 = _job(KEY, "n1", "failed", at=2000.0)
NEWER_RELEASED = {**RELEASED, "metadata": {**RELEASED["metadata"], "creationTimestamp": "1970-01-01T00:25:00Z"}}


@pytest.mark.parametrize(("keys", "volumes", "pods", "jobs", "expected"), [
    # a ModelService deleted while the operator was stopped: its PV Released, its pods gone; the
    # PV stays until every node's Job succeeded
    ([KEY], [RELEASED], [], [], [Eviction(KEY, ("n1", "n2"))]),
    # a Bound PV of the key (another ModelService of the model, any namespace) keeps it
    ([KEY], [RELEASED, _pv(KEY, namespace="other")], [], [], []),
    ([KEY], [_pv(KEY, phase="Available")], [], [], []),          # a claim not bound yet
    ([KEY], [RELEASED], [_pod(KEY)], [], []),                     # a pod still mounts it
    ([KEY], [RELEASED], [_pod(KEY)], [FAIL1], []),                # in use again: no retry
    ([KEY], [_pv(KEY, phase="Failed")], [], [], []),              # a phase it does not know: kept
    # never a second Job beside a running one; the PV waits for it
    ([KEY], [RELEASED], [], [_job(KEY, "n1")], [Eviction(KEY, ("n2",))]),
    ([KEY], [RELEASED], [], [_job(KEY, "n1"), _job(KEY, "n2")], []),
    ([KEY], [RELEASED], [], [OK1, _job(KEY, "n2")], []),         # one done, one running: wait
    # succeeded on every node of the group: now the released PV goes
    ([KEY], [RELEASED], [], [OK1, OK2], [Eviction(KEY, (), (R,))]),
    ([KEY], [], [], [OK1, OK2], []),                              # evicted, its PV gone: nothing
    # a failed Job (the node unreachable): written again, the failed one deleted, the PV kept
    ([KEY], [RELEASED], [], [OK1, FAIL2], [Eviction(KEY, ("n2",), (), (_name(FAIL2),))]),
    ([KEY], [], [], [FAIL1, FAIL2], [Eviction(KEY, ("n1", "n2"), (), tuple(sorted(map(_name, (FAIL1, FAIL2)))))]),
    # the latest Job of a node decides: a retry that succeeded ends it, one running waits
    ([KEY], [RELEASED], [], [FAIL1, LATER_OK1, OK2], [Eviction(KEY, (), (R,), (_name(FAIL1),))]),
    ([KEY], [RELEASED], [], [FAIL1, LATER_RUN1, OK2], [Eviction(KEY, (), (), (_name(FAIL1),))]),
    ([KEY], [RELEASED], [], [OK1, LATER_FAIL1, OK2], [Eviction(KEY, ("n1",), (), (_name(LATER_FAIL1),))]),
    # a node that left the group (deleted, or its label removed) does not hold the PV back
    ([KEY], [RELEASED], [], [OK1, OK2, _job(KEY, "gone", "failed")], [Eviction(KEY, (), (R,))]),
    ([KEY], [RELEASED], [], [OK1, OK2, _job(KEY, "gone")], [Eviction(KEY, (), (R,))]),
    ([KEY], [RELEASED], [], [_job(OTHER, "n1")], [Eviction(KEY, ("n1", "n2"))]),  # another key's Job
    # an earlier eviction's Jobs, older than the released PV (not collected yet): they do not count
    ([KEY], [NEWER_RELEASED], [], [OK1, OK2], [Eviction(KEY, ("n1", "n2"))]),
    ([KEY], [NEWER_RELEASED], [], [FAIL1, LATER_OK1, _job(KEY, "n2", "succeeded", at=2000.0)],
     [Eviction(KEY, (), (R,), (_name(FAIL1),))]),
    ([KEY], [NEWER_RELEASED], [], [_job(KEY, "n1"), OK2], [Eviction(KEY, ("n2",))]),  # running: still no second
    # the watch path: the deleted ModelService's PV being deleted, no Jobs read
    ([KEY], [_pv(KEY, deleting=True)], [], [], [Eviction(KEY, ("n1", "n2"))]),
    ([KEY, OTHER], [RELEASED, _pv(OTHER)], [], [], [Eviction(KEY, ("n1", "n2"))]),  # per key
    ([], [RELEASED], [], [], []),                                 # only the keys asked about
], ids=["missed-deletion", "other-pv-bound", "pv-unbound", "pod-mounts", "in-use-again-no-retry", "pv-failed",
        "one-node-running", "all-running", "one-done-one-running", "all-succeeded-pv-deleted", "all-done-pv-gone",
        "one-node-failed-rewritten", "failed-without-pv", "retry-succeeded", "retry-running", "latest-failed",
        "failed-node-left-group", "running-node-left-group", "other-keys-job", "jobs-older-than-pv",
        "jobs-newer-than-pv", "older-job-running", "watch-path", "two-keys",
        "no-keys"])
def test_plan_evictions(keys, volumes, pods, jobs, expected) -> None:
    assert plan_evictions(keys, volumes, pods, jobs, ["n2", "n1"]) == expected


@pytest.mark.parametrize(("job", "state"), [
    (_job(KEY, "n1"), "running"), (OK1, "succeeded"), (FAIL1, "failed"),
    # the controller marks FailureTarget first, while the pods terminate: not finished yet
    ({**_job(KEY, "n1"), "status": {"conditions": [{"type": "FailureTarget", "status": "True"}]}}, "running"),
    ({**_job(KEY, "n1"), "status": {"conditions": [{"type": "Failed", "status": "False"}]}}, "running"),
])
def test_job_state(job: dict, state: str) -> None:
    assert job_state(job) == state


def test_the_sweep_retries_the_keys_of_failed_jobs_on_nodes_of_the_group() -> None:
    """A key no PV names (a rollout's earlier revision) is taken up again by its failed Job."""
    jobs = [FAIL1, _job(OTHER, "n1"), _job(cache_key("hf://x/y"), "gone", "failed"), OK2]
    assert retry_keys(jobs, ["n1", "n2"]) == {KEY}


def test_with_no_cache_node_the_released_volume_stays_as_the_keys_record() -> None:
    assert plan_evictions([KEY], [RELEASED], [], [], []) == []


def test_the_sweep_considers_only_the_watched_namespaces_keys() -> None:
    volumes = [_pv(KEY, namespace="ml"), _pv(OTHER, namespace="elsewhere"), {"metadata": {"name": "x"}}]
    assert sweep_keys(volumes, ()) == {KEY, OTHER}
    assert sweep_keys(volumes, ("ml",)) == {KEY}


class _Cluster:
    """The API as the sweep reads it: one LIST per kind (pods per watched namespace); a kind in
    ``failing`` answers with an error, as a LIST refused (403) or timed out would."""

    def __init__(self, volumes=(), pods=(), nodes=("n1",), jobs=(), failing=()) -> None:
        self.objects = {"PersistentVolume": list(volumes), "Pod": list(pods), "Job": list(jobs),
                        "Node": [{"metadata": {"name": n}} for n in nodes]}
        self.failing = set(failing)
        self.calls: list[tuple] = []

    def list(self, kind, namespace, selector):
        self.calls.append(("list", kind, namespace, selector))
        if kind in self.failing:
            raise ApiError(403, f"{kind} is forbidden")
        return self.objects[kind]

    def apply(self, obj, force=False):
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return obj

    def delete(self, kind, namespace, name, uid=None):
        self.calls.append(("delete", kind, name))

    def writes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] != "list"]


def test_the_sweep_evicts_a_missed_deletion_and_keeps_its_released_volume_until_it_succeeded() -> None:
    kube = _Cluster(volumes=[RELEASED, _pv(OTHER)], pods=[_pod(OTHER)], nodes=("n1", "n2"))
    jobs = sweep(kube, SETTINGS)
    assert len(jobs) == 2
    assert [c[:2] for c in kube.writes()] == [("apply", "PersistentVolume"), ("apply", "PersistentVolumeClaim"),
                                              ("apply", "Job"), ("apply", "Job")]  # the PV: the key's record
    lists = {c[1]: c[2:] for c in kube.calls if c[0] == "list"}
    assert lists["Node"] == ("", f"{SETTINGS.model_cache_node_label}=true")
    assert lists["Job"] == ("kubemaas-system", "app.kubernetes.io/component=model-cache-evict")
    assert lists["Pod"] == ("", CACHE_KEY_LABEL)  # cluster-wide, by the key label


def test_the_sweep_reads_pods_in_each_watched_namespace() -> None:
    kube = _Cluster(volumes=[_pv(KEY, phase="Released", namespace="ml")])
    sweep(kube, SETTINGS.model_copy(update={"namespaces": ("ml", "ml-staging")}))
    assert [c[2] for c in kube.calls if c[:2] == ("list", "Pod")] == ["ml", "ml-staging"]


@pytest.mark.parametrize("failing", ["PersistentVolume", "Pod", "Node", "Job"])
def test_a_failed_list_evicts_nothing(failing: str) -> None:
    """Fail closed: a view without the pods (or the PVs, the nodes, the Jobs there are) could
    take an entry in use for unused, or run a second Job; the sweep writes nothing."""
    kube = _Cluster(volumes=[RELEASED], failing={failing})
    with pytest.raises(ApiError):
        sweep(kube, SETTINGS)
    assert kube.writes() == []


def test_a_second_sweep_writes_nothing() -> None:
    kube = _Cluster(volumes=[RELEASED], nodes=("n1",))
    (name,) = sweep(kube, SETTINGS)
    job = next(c for c in kube.writes() if c[1] == "Job")
    assert job[2] == name
    # what the cluster holds after the first pass: the PV and the Job, running
    again = _Cluster(volumes=[RELEASED], jobs=[_job(KEY, "n1")], nodes=("n1",))
    assert sweep(again, SETTINGS) == [] and again.writes() == []


def test_a_failed_eviction_is_run_again_by_a_later_pass_and_the_volume_goes_once_it_succeeded() -> None:
    """A node unreachable while its Job ran: the Job fails after its retries; the next pass
    writes a new one (a new decision time) and only then deletes the failed one; the PV, the
    key's record, stays until every node succeeded, then goes."""
    failed = _job(KEY, "n2", "failed")
    kube = _Cluster(volumes=[RELEASED], jobs=[OK1, failed], nodes=("n1", "n2"))
    (rewritten,) = sweep(kube, SETTINGS)
    assert rewritten != _name(failed)
    assert [c for c in kube.writes() if c[1] in ("Job", "PersistentVolume")][-2:] == [
        ("apply", "Job", rewritten), ("delete", "Job", _name(failed))]  # written first: the record holds
    assert ("delete", "PersistentVolume", R) not in kube.writes()
    retry = _job(KEY, "n2", "running", at=2000.0)
    waiting = _Cluster(volumes=[RELEASED], jobs=[OK1, retry], nodes=("n1", "n2"))
    assert sweep(waiting, SETTINGS) == [] and waiting.writes() == []
    retry["status"] = _job(KEY, "n2", "succeeded")["status"]
    done = _Cluster(volumes=[RELEASED], jobs=[OK1, retry], nodes=("n1", "n2"))
    assert sweep(done, SETTINGS) == [] and done.writes() == [("delete", "PersistentVolume", R)]


def test_a_failed_job_whose_key_no_volume_names_is_run_again() -> None:
    """A rollout's earlier revision (its PV's label moved to the new key) or a ModelService
    deleted under a running operator (its PV deleted then): the failed Job is the key's record."""
    failed = _job(KEY, "n1", "failed")
    kube = _Cluster(volumes=[], jobs=[failed], nodes=("n1",))
    (rewritten,) = sweep(kube, SETTINGS)
    assert kube.writes()[-2:] == [("apply", "Job", rewritten), ("delete", "Job", _name(failed))]
    # on a node that left the group it is no longer run
    gone = _Cluster(volumes=[], jobs=[_job(KEY, "gone", "failed")], nodes=("n1",))
    assert sweep(gone, SETTINGS) == [] and gone.writes() == []


@pytest.mark.parametrize(("volume", "ops"), [
    ({"spec": {"claimRef": {"name": "m-model-cache", "uid": "u1"}}, "status": {"phase": "Released"}},
     [{"op": "test", "path": "/spec/claimRef/uid", "value": "u1"}, {"op": "remove", "path": "/spec/claimRef/uid"}]),
    ({"spec": {"claimRef": {"name": "m-model-cache", "uid": "u1"}}, "status": {"phase": "Bound"}}, None),
    ({"spec": {"claimRef": {"name": "m-model-cache"}}, "status": {"phase": "Available"}}, None),
    ({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
      "spec": {"claimRef": {"uid": "u1"}}, "status": {"phase": "Released"}}, None),
], ids=["released", "bound", "pre-bound", "being-deleted"])
def test_a_released_volume_is_reopened_for_a_new_claim_of_the_same_name(volume: dict, ops: list | None) -> None:
    assert reopen_released_volume(volume) == ops
