"""Status from observed children: one case per reason a person can act on."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kubemaas_operator.observe import Observation, Problem, VariantPlan, compute_status, pod_problem

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _dep(name: str, replicas: int, ready: int, generation: int = 1, observed: int = 1) -> dict:
    return {"metadata": {"name": name, "generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": replicas,
                       "readyReplicas": ready, "availableReplicas": ready}}


def _obs(deployments: dict, pods: tuple = (), blocking: Problem | None = None) -> Observation:
    return Observation(
        name="m", namespace="ns", generation=3, selector="kubemaas.io/modelservice=m",
        url="http://m.ns.svc.cluster.local/v2/models/m", runtime_image="img:1",
        variants=(VariantPlan("a", "bf16", 80, 4, "m-a"), VariantPlan("b", "int8-weight-only", 20, 1, "m-b")),
        deployments=deployments, pods=pods, blocking=blocking,
    )


def _cond(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_all_available_is_ready_with_counts_and_shares() -> None:
    st = compute_status(_obs({"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1)}), now=NOW)
    assert _cond(st, "Ready")["status"] == "True"
    assert _cond(st, "Ready")["reason"] == "AllVariantsAvailable"
    assert _cond(st, "Progressing")["status"] == "False"
    assert (st["replicas"], st["readyReplicas"], st["observedGeneration"]) == (5, 5, 3)
    assert [v["trafficShare"] for v in st["variants"]] == [80, 20]


def test_status_fits_the_crd_status_schema() -> None:
    from kubemaas_operator.api import ModelServiceStatus

    st = compute_status(_obs({"m-a": _dep("m-a", 4, 3), "m-b": _dep("m-b", 1, 1)}, pods=(_pending("x"),)), now=NOW)
    parsed = ModelServiceStatus.model_validate(st)
    assert parsed.to_wire() == st
    assert st["variantSummary"] == "a 3/4, b 1/1"


def test_a_deployment_not_yet_observed_at_its_generation_is_progressing() -> None:
    deps = {"m-a": _dep("m-a", 4, 4, generation=2, observed=1), "m-b": _dep("m-b", 1, 1)}
    st = compute_status(_obs(deps), now=NOW)
    assert _cond(st, "Ready")["status"] == "False"
    assert _cond(st, "Progressing")["status"] == "True"


def test_a_stale_copy_older_than_our_apply_is_not_rolled_out() -> None:
    deps = {"m-a": _dep("m-a", 4, 4, generation=2, observed=2), "m-b": _dep("m-b", 1, 1)}
    obs = _obs(deps)
    fresh = compute_status(obs, now=NOW)
    assert _cond(fresh, "Ready")["status"] == "True"
    stale = compute_status(Observation(**{**obs.__dict__, "applied_generations": {"m-a": 3}}), now=NOW)
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
    st = compute_status(_obs({"m-a": _dep("m-a", 4, 3), "m-b": _dep("m-b", 1, 1)}, pods=(pod,)), now=NOW)
    assert _cond(st, "Ready")["reason"] == reason
    assert _cond(st, "Degraded")["status"] == "True"


def test_a_healthy_pod_has_no_problem() -> None:
    pod = {"status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
                      "containerStatuses": [{"name": "runtime", "state": {"running": {}}}]}}
    assert pod_problem(pod) is None


def test_a_blocking_problem_wins_and_stops_progress() -> None:
    blocking = Problem("NameConflict", "Deployment m-a belongs to ModelService other.")
    st = compute_status(_obs({}, blocking=blocking), now=NOW)
    assert _cond(st, "Ready")["reason"] == "NameConflict"
    assert _cond(st, "Progressing")["status"] == "False"


def test_transition_time_kept_while_status_unchanged() -> None:
    deps = {"m-a": _dep("m-a", 4, 4), "m-b": _dep("m-b", 1, 1)}
    first = compute_status(_obs(deps), now=NOW)
    later = compute_status(_obs(deps), previous_conditions=first["conditions"],
                           now=datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert _cond(later, "Ready")["lastTransitionTime"] == _cond(first, "Ready")["lastTransitionTime"]
