"""Status from observed children: one case per reason a person can act on."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from kubemaas_operator.api import ModelServiceStatus
from kubemaas_operator.api.status import RolloutStatus
from kubemaas_operator.builders.image import RuntimeImages
from kubemaas_operator.builders.layout import Track, VariantLayout
from kubemaas_operator.observe import Observation, compute_status, pod_problem
from kubemaas_operator.problem import Problem

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _dep(name: str, replicas: int, ready: int, generation: int = 1, observed: int = 1) -> dict:
    return {"metadata": {"name": name, "generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": replicas,
                       "readyReplicas": ready, "availableReplicas": ready}}


def _plan(name: str, quantization: str, weight: int, replicas: int, deployment: str, revision: str = "",
          stable_replicas: int | None = None, canary: Track | None = None, canary_weight: int = 0) -> VariantLayout:
    stable = Track(deployment, revision, replicas if stable_replicas is None else stable_replicas)
    return VariantLayout(name, weight, replicas, stable, canary, canary_weight, quantization=quantization)


def _obs(deployments: dict, pods: tuple = (), blocking: Problem | None = None) -> Observation:
    return Observation(
        name="m", namespace="ns", generation=3, selector="kubemaas.io/modelservice=m",
        url="http://m.ns.svc.cluster.local/v2/models/m", runtime_image=RuntimeImages.single("img:1"),
        variants=(_plan("a", "bf16", 80, 4, "m-a"), _plan("b", "int8-weight-only", 20, 1, "m-b")),
        deployments=deployments, pods=pods, blocking=blocking,
    )


def _status(obs: Observation, previous: dict | None = None, now: datetime = NOW) -> dict:
    """compute_status as written: its model on the wire (a rollout given as a dict parsed first)."""
    if isinstance(obs.rollout, dict):
        obs = dataclasses.replace(obs, rollout=RolloutStatus.model_validate(obs.rollout))
    parsed = ModelServiceStatus.model_validate(previous) if previous else None
    return compute_status(obs, parsed, now=now).to_wire()


def _cond(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_all_available_is_ready_with_counts_and_shares() -> None:
    st = _status(_obs({"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1)}))
    assert _cond(st, "Ready")["status"] == "True"
    assert _cond(st, "Ready")["reason"] == "AllVariantsAvailable"
    assert _cond(st, "Progressing")["status"] == "False"
    assert (st["replicas"], st["readyReplicas"], st["observedGeneration"]) == (5, 5, 3)
    assert [v["trafficShare"] for v in st["variants"]] == [80, 20]


def test_status_fits_the_crd_status_schema() -> None:
    from kubemaas_operator.api import ModelServiceStatus

    st = _status(_obs({"m-a": _dep("m-a", 4, 3), "m-b": _dep("m-b", 1, 1)}, pods=(_pending("x"),)))
    parsed = ModelServiceStatus.model_validate(st)
    assert parsed.to_wire() == st
    assert st["variantSummary"] == "a 3/4, b 1/1"


def test_a_deployment_not_yet_observed_at_its_generation_is_progressing() -> None:
    deps = {"m-a": _dep("m-a", 4, 4, generation=2, observed=1), "m-b": _dep("m-b", 1, 1)}
    st = _status(_obs(deps))
    assert _cond(st, "Ready")["status"] == "False"
    assert _cond(st, "Progressing")["status"] == "True"


def test_a_stale_copy_older_than_our_apply_is_not_rolled_out() -> None:
    deps = {"m-a": _dep("m-a", 4, 4, generation=2, observed=2), "m-b": _dep("m-b", 1, 1)}
    obs = _obs(deps)
    fresh = _status(obs)
    assert _cond(fresh, "Ready")["status"] == "True"
    stale = _status(Observation(**{**obs.__dict__, "applied_generations": {"m-a": 3}}))
    assert _cond(stale, "Ready")["status"] == "False"
    assert _cond(stale, "Progressing")["status"] == "True"


def _pending(message: str) -> dict:
    return {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}}


def _waiting(reason: str, message: str = "") -> dict:
    return {"status": {"containerStatuses": [
        {"name": "runtime", "image": "img:1", "state": {"waiting": {"reason": reason, "message": message}}}]}}


def _crashed(message: str, exit_code: int = 1) -> dict:
    return {"status": {"containerStatuses": [
        {"name": "runtime", "image": "img:1", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": exit_code, "message": message, "reason": "Error"}}}]}}


@pytest.mark.parametrize(
    ("pod", "reason", "fragment"),
    [
        (_pending("0/5 nodes are available: 5 Insufficient nvidia.com/gpu."), "Unschedulable",
         "Insufficient nvidia.com/gpu"),
        (_pending('persistentvolumeclaim "models" not found'), "PersistentVolumeClaimNotFound", "models"),
        (_waiting("ErrImagePull", "not found"), "ImagePullFailed", "img:1"),
        (_waiting("ImagePullBackOff"), "ImagePullFailed", "cannot be pulled"),
        (_crashed("QuantizationDriftExceeded: 0.04 > 0.01"), "QuantizationDriftExceeded", "0.04 > 0.01"),
        (_crashed("ModelLoadFailed: no config.json in /mnt/models"), "ModelLoadFailed", "config.json"),
        (_crashed("segfault somewhere"), "CrashLoopBackOff", "exit code 1"),
    ],
)
def test_pod_problems_become_reasons(pod: dict, reason: str, fragment: str) -> None:
    problem = pod_problem(pod)
    assert problem is not None and problem.reason == reason
    assert fragment in problem.message
    st = _status(_obs({"m-a": _dep("m-a", 4, 3), "m-b": _dep("m-b", 1, 1)}, pods=(pod,)))
    assert _cond(st, "Ready")["reason"] == reason
    assert _cond(st, "Degraded")["status"] == "True"


def test_a_healthy_pod_has_no_problem() -> None:
    pod = {"status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
                      "containerStatuses": [{"name": "runtime", "state": {"running": {}}}]}}
    assert pod_problem(pod) is None


def test_a_blocking_problem_wins_and_stops_progress() -> None:
    blocking = Problem("NameConflict", "Deployment m-a belongs to ModelService other.")
    st = _status(_obs({}, blocking=blocking))
    assert _cond(st, "Ready")["reason"] == "NameConflict"
    assert _cond(st, "Progressing")["status"] == "False"


def test_transition_time_kept_while_status_unchanged() -> None:
    deps = {"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1)}
    first = _status(_obs(deps))
    later = _status(_obs(deps), previous=first, now=datetime(2026, 1, 2, tzinfo=UTC))
    assert _cond(later, "Ready")["lastTransitionTime"] == _cond(first, "Ready")["lastTransitionTime"]


# --- rollouts: surges that cannot be placed, canaries -------------------------------------------

GPU_FULL = "0/5 nodes are available: 2 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node affinity."


def _labelled(pod: dict, variant: str, revision: str) -> dict:
    return {**pod, "metadata": {"labels": {"kubemaas.io/variant": variant, "kubemaas.io/revision": revision}}}


def _rolling(dep: dict, updated: int) -> dict:
    return {**dep, "status": {**dep["status"], "updatedReplicas": updated, "replicas": dep["spec"]["replicas"] + 1}}


def _plans(canary: bool = False) -> tuple[VariantLayout, ...]:
    if canary:
        return (_plan("a", "bf16", 80, 4, "m-a", revision="old111", stable_replicas=4,
                      canary=Track("m-a-new222", "new222", 1), canary_weight=0),
                _plan("b", "int8-weight-only", 20, 1, "m-b", revision="bbb333"))
    return (_plan("a", "bf16", 80, 4, "m-a", revision="new222"),
            _plan("b", "int8-weight-only", 20, 1, "m-b", revision="bbb333"))


def test_a_surge_pod_that_cannot_be_placed_is_reported_with_capacity_kept() -> None:
    deps = {"m-a": _rolling(_dep("m-a", 4, 4), updated=0), "m-b": _dep("m-b", 1, 1)}
    pod = _labelled(_pending(GPU_FULL), "a", "new222")
    st = _status(Observation(**{**_obs(deps, pods=(pod,)).__dict__, "variants": _plans()}))
    ready = _cond(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SurgeUnschedulable")
    assert "Insufficient nvidia.com/gpu" in ready["message"] and "keep serving" in ready["message"]
    assert "maxUnavailable" in ready["message"]
    assert st["readyReplicas"] == 5


def test_an_unschedulable_pod_without_capacity_behind_it_is_plain_unschedulable() -> None:
    deps = {"m-a": _dep("m-a", 4, 2), "m-b": _dep("m-b", 1, 1)}
    pod = _labelled(_pending(GPU_FULL), "a", "new222")
    st = _status(Observation(**{**_obs(deps, pods=(pod,)).__dict__, "variants": _plans()}))
    assert _cond(st, "Ready")["reason"] == "Unschedulable"


def test_a_canary_pod_that_cannot_be_placed_leaves_the_stable_serving() -> None:
    deps = {"m-a": _dep("m-a", 4, 4), "m-a-new222": _dep("m-a-new222", 1, 0), "m-b": _dep("m-b", 1, 1)}
    pod = _labelled(_pending(GPU_FULL), "a", "new222")
    rollout = {"strategy": "Canary", "phase": "Progressing", "canaryRevision": "c1", "message": "step 1/2"}
    obs = Observation(**{**_obs(deps, pods=(pod,)).__dict__, "variants": _plans(canary=True), "rollout": rollout})
    st = _status(obs)
    assert _cond(st, "Ready")["reason"] == "SurgeUnschedulable"
    assert "stable revision keeps its 4 pod(s)" in _cond(st, "Ready")["message"]


def test_a_canary_at_its_step_is_ready_and_progressing_with_its_share() -> None:
    deps = {"m-a": _dep("m-a", 3, 3), "m-a-new222": _dep("m-a-new222", 1, 1), "m-b": _dep("m-b", 1, 1)}
    plans = (_plan("a", "bf16", 80, 4, "m-a", revision="old111", stable_replicas=3,
                   canary=Track("m-a-new222", "new222", 1), canary_weight=20), _plans()[1])
    rollout = {"strategy": "Canary", "phase": "Progressing", "canaryRevision": "c1", "step": 1, "steps": 2,
               "canaryWeight": 20, "message": "Step 1/2: 20% on revision c1; pausing 60 s more."}
    for gateway, share in ((False, 20), (True, 16)):
        obs = Observation(**{**_obs(deps).__dict__, "variants": plans, "rollout": rollout, "gateway": gateway})
        st = _status(obs)
        assert (_cond(st, "Ready")["status"], _cond(st, "Ready")["reason"]) == ("True", "CanaryInProgress")
        assert _cond(st, "Progressing")["reason"] == "CanaryProgressing"
        a = st["variants"][0]
        assert (a["readyReplicas"], a["canaryReadyReplicas"], a["canaryTrafficShare"]) == (4, 1, share)
        assert st["variantSummary"] == "a 4/4 (canary 1/1), b 1/1"
        assert st["rollout"]["step"] == 1
    held = _status(Observation(**{**obs.__dict__, "rollout": {**rollout, "phase": "Held"}}))
    assert _cond(held, "Progressing")["reason"] == "CanaryHeld"


def test_an_earlier_revision_still_serving_counts_and_keeps_the_rollout_open() -> None:
    retiring = _dep("m-a-old", 1, 1)
    retiring["metadata"]["labels"] = {"kubemaas.io/variant": "a"}
    deps = {"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1), "m-a-old": retiring}
    st = _status(Observation(**{**_obs(deps).__dict__, "rollout": {"strategy": "Canary", "phase": "Complete"}}))
    assert st["readyReplicas"] == 6 and st["rollout"]["phase"] == "Progressing"
    assert _cond(st, "Ready")["status"] == "False"


def test_groups_left_from_several_nodes_serve_until_pruned_and_hold_the_rollout() -> None:
    """A variant on one node again (resources.gpu.nodes lowered to 1) whose groups are kept
    while its Deployment rolls out: their ready heads count, status lists them, and the
    ModelService is not rolled out until they are gone."""
    from kubemaas_operator.builders.naming import VARIANT_LABEL
    from kubemaas_operator.builders.raycluster import GROUP_NAME_LABEL
    from kubemaas_operator.builders.revision import REVISION_LABEL

    labels = {GROUP_NAME_LABEL: "m-a-old-0", VARIANT_LABEL: "a", REVISION_LABEL: "old"}
    ready = {"type": "Ready", "status": "True"}
    pods = tuple({"metadata": {"labels": labels}, "status": {"conditions": [ready]}} for _ in range(2))
    st = _status(_obs({"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1)}, pods=pods))
    a, b = st["variants"]
    assert (a["replicas"], a["readyReplicas"]) == (4, 5)  # 4 pods of the Deployment + the group
    assert a["groups"] == [{"name": "m-a-old-0", "revision": "old", "nodes": 2, "readyNodes": 2, "ready": True}]
    assert "groups" not in b
    assert _cond(st, "Ready")["status"] == "False" and _cond(st, "Progressing")["status"] == "True"
    gone = _status(_obs({"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1)}))
    assert _cond(gone, "Ready")["status"] == "True" and "groups" not in gone["variants"][0]
