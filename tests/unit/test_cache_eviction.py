"""Eviction of node-cache entries: who still refers to a key, and the Jobs that remove it."""

from __future__ import annotations

import pytest
from kubemaas_operator.builders.cache_eviction import (
    EVICT_CLAIM,
    build_evict_claim,
    build_evict_job,
    build_evict_volume,
)
from kubemaas_operator.builders.model_cache import CACHE_KEY_LABEL, cache_key
from kubemaas_operator.cache_eviction import (
    evict_if_unreferenced,
    eviction_enabled,
    eviction_objects,
    referenced,
    volume_refers,
)
from kubemaas_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(model_cache=True, model_cache_eviction_namespace="kubemaas-system",
                            runtime_image="registry.example/runtime:2.0")
KEY = cache_key("hf://org/m@abc123")
OTHER = cache_key("hf://org/m@def456")


def _pv(key: str, phase: str = "Bound", deleting: bool = False) -> dict:
    meta: dict = {"name": f"kubemaas-cache-ns-{key}", "labels": {CACHE_KEY_LABEL: key}}
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
