"""Rollouts on the real control plane: a canary walking its steps with the weights on the
HTTPRoute (Gateway API CRDs installed by a fixture), promotion that restarts nothing, a revert
that rolls back without a new rollout, and a surge that cannot be scheduled on GPU nodes."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.e2e.cluster import Cluster
from tests.e2e.msvc import (
    REPO,
    apply,
    condition,
    deployments,
    get,
    modelservice,
    wait_ready,
    wait_reason,
)

pytestmark = pytest.mark.e2e
ROUTE_CRD = "httproutes.gateway.networking.k8s.io"
L4 = "NVIDIA-L4"


@pytest.fixture(scope="module")
def gateway_api(cluster: Cluster, crd: str) -> Iterator[str]:
    """A stand-in for the Gateway API's HTTPRoute CRD (the schema is not what is tested here:
    the operator's objects are), removed afterwards."""
    body = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": ROUTE_CRD,
                     "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api"}},
        "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                 "names": {"kind": "HTTPRoute", "plural": "httproutes", "singular": "httproute"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{ROUTE_CRD}", "--timeout=60s")
    try:
        yield ROUTE_CRD
    finally:
        cluster.kubectl("delete", "crd", ROUTE_CRD, "--ignore-not-found", check=False)


def _pods(cluster: Cluster, namespace: str, name: str) -> dict[str, dict]:
    items = cluster.get_json("pods", "-n", namespace, "-l", f"kubemaas.io/modelservice={name}")["items"]
    return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}


def _replicasets(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    """ReplicaSet name -> the Deployment that owns it."""
    items = cluster.get_json("replicasets", "-n", namespace, "-l", f"kubemaas.io/modelservice={name}")["items"]
    return {rs["metadata"]["name"]: rs["metadata"]["ownerReferences"][0]["name"] for rs in items}


def _route_weights(cluster: Cluster, namespace: str, name: str) -> dict[str, int]:
    route = cluster.get_json("httproutes.gateway.networking.k8s.io", name, "-n", namespace)
    return {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}


def _rollout(cluster: Cluster, namespace: str, name: str) -> dict:
    return get(cluster, namespace, name).get("status", {}).get("rollout") or {}


def _wait_rollout(cluster: Cluster, namespace: str, name: str, timeout: float = 90, **expected) -> dict:
    def matches() -> dict | None:
        ms = get(cluster, namespace, name)
        rollout = ms.get("status", {}).get("rollout") or {}
        current = ms.get("status", {}).get("observedGeneration") == ms["metadata"]["generation"]
        return ms if current and all(rollout.get(k) == v for k, v in expected.items()) else None

    return cluster.wait_until(matches, timeout=timeout, what=f"{namespace}/{name} rollout {expected}")


def _canary(name: str, steps: list[dict], replicas: int = 4) -> dict:
    manifest = modelservice(name, replicas=replicas)
    manifest["spec"]["rollout"] = {"strategy": "Canary", "steps": steps}
    return manifest


def _changed(manifest: dict, batch: int = 64) -> dict:
    out = copy.deepcopy(manifest)
    out["spec"]["runtime"] = {"maxBatchSize": batch}
    return out


def test_a_canary_walks_its_steps_on_the_route_and_promotes_without_restarting(
        cluster: Cluster, operator, gateway_api: str, namespace: str) -> None:
    base = _canary("cn", [{"weight": 25, "pauseSeconds": 8}, {"weight": 50}])
    base["spec"]["gateway"] = {"name": "public", "namespace": "gateways"}
    apply(cluster, namespace, base, server_side=True)
    first = wait_ready(cluster, namespace, "cn")
    stable_rev = first["status"]["variants"][0]["revision"]
    assert set(deployments(cluster, namespace, "cn")) == {"cn-default"}
    assert _route_weights(cluster, namespace, "cn") == {f"cn-default-{stable_rev}": 10000}
    stable_pods = set(_pods(cluster, namespace, "cn"))
    stable_rs = set(_replicasets(cluster, namespace, "cn"))

    apply(cluster, namespace, _changed(base), server_side=True)
    # step 1: one canary pod, then 25% of the traffic on it; the stable keeps 3 pods
    ms = _wait_rollout(cluster, namespace, "cn", step=1, canaryWeight=25)
    canary_rev = ms["status"]["variants"][0]["canaryRevision"]
    canary_dep = f"cn-default-{canary_rev}"
    assert ms["status"]["variants"][0]["canaryDeployment"] == canary_dep
    assert "kopf.kubemaas.io/finalizer" in ms["metadata"].get("finalizers", [])  # while its timer runs
    assert _route_weights(cluster, namespace, "cn") == {f"cn-default-{stable_rev}": 7500,
                                                        f"cn-default-{canary_rev}": 2500}
    # step 2 has no pause: it holds, half the traffic on 2 canary pods
    ms = _wait_rollout(cluster, namespace, "cn", step=2, phase="Held", canaryWeight=50)
    # kopf's finalizer came with the canary's timer and left when the held step stopped it
    cluster.wait_until(lambda: not get(cluster, namespace, "cn")["metadata"].get("finalizers"), timeout=30,
                       what="kopf's finalizer removed while the canary holds")
    assert _route_weights(cluster, namespace, "cn") == {f"cn-default-{stable_rev}": 5000,
                                                        f"cn-default-{canary_rev}": 5000}
    assert condition(ms, "Progressing")["reason"] == "CanaryHeld"
    assert "spec.rollout.steps[1]" in condition(ms, "Progressing")["message"]
    deps = deployments(cluster, namespace, "cn")
    assert (deps["cn-default"]["spec"]["replicas"], deps[canary_dep]["spec"]["replicas"]) == (2, 2)
    # the previous revision kept serving, untouched: same ReplicaSet, its pods still there
    assert {rs for rs, owner in _replicasets(cluster, namespace, "cn").items() if owner == "cn-default"} == stable_rs
    assert len(stable_pods & set(_pods(cluster, namespace, "cn"))) == 2

    # the spec advances the held step: promotion
    advanced = _changed(base)
    advanced["spec"]["rollout"]["steps"][1]["pauseSeconds"] = 0
    canary_pods_before = {n for n, p in _pods(cluster, namespace, "cn").items()
                          if p["metadata"]["labels"]["kubemaas.io/revision"] == canary_rev}
    apply(cluster, namespace, advanced, server_side=True)
    ms = _wait_rollout(cluster, namespace, "cn", phase="Complete", stableRevision=ms["status"]["rollout"]["canaryRevision"],
                       timeout=120)
    cluster.wait_until(lambda: set(deployments(cluster, namespace, "cn")) == {canary_dep}, timeout=60,
                       what="the old stable Deployment removed")
    ms = wait_ready(cluster, namespace, "cn")
    assert not ms["metadata"].get("finalizers")
    variant = ms["status"]["variants"][0]
    assert (variant["deployment"], variant["revision"]) == (canary_dep, canary_rev)
    assert "canaryDeployment" not in variant
    assert _route_weights(cluster, namespace, "cn") == {f"cn-default-{canary_rev}": 10000}
    assert deployments(cluster, namespace, "cn")[canary_dep]["metadata"]["labels"]["kubemaas.io/track"] == "stable"
    # promotion restarted nothing: the canary's pods are the stable's now, one ReplicaSet
    assert canary_pods_before <= set(_pods(cluster, namespace, "cn"))
    cluster.wait_until(lambda: list(_replicasets(cluster, namespace, "cn").values()) == [canary_dep],
                       timeout=60, what="one ReplicaSet left, the promoted canary's")
    cluster.wait_until(lambda: cluster.kubectl("get", "service", f"cn-default-{stable_rev}", "-n", namespace,
                                               check=False).returncode != 0,
                       timeout=30, what="the old revision's Service removed")


def test_the_canary_example_reverted_during_a_step_rolls_back_without_a_new_rollout(
        cluster: Cluster, operator, namespace: str) -> None:
    base = yaml.safe_load((REPO / "examples" / "canary.yaml").read_text())
    name = base["metadata"]["name"]
    apply(cluster, namespace, base, server_side=True)
    wait_ready(cluster, namespace, name)
    stable_rs = set(_replicasets(cluster, namespace, name))
    stable_pods = set(_pods(cluster, namespace, name))

    apply(cluster, namespace, _changed(base), server_side=True)
    # step 1 of the example: one of the 4 pods on the new revision, then its 5-minute pause
    ms = _wait_rollout(cluster, namespace, name, step=1, canaryWeight=25)
    variant = ms["status"]["variants"][0]
    assert (variant["canaryReplicas"], variant["canaryReadyReplicas"]) == (1, 1)
    # without a gateway the weight follows the pods: 3 stable + 1 canary
    assert variant["canaryTrafficShare"] == 25
    assert deployments(cluster, namespace, name)[f"{name}-default"]["spec"]["replicas"] == 3
    assert "pausing" in ms["status"]["rollout"]["message"]

    apply(cluster, namespace, base, server_side=True)   # git revert
    cluster.wait_until(lambda: set(deployments(cluster, namespace, name)) == {f"{name}-default"}, timeout=60,
                       what="the canary removed")
    ms = wait_ready(cluster, namespace, name)
    assert ms["status"]["rollout"]["phase"] == "Complete"
    assert deployments(cluster, namespace, name)[f"{name}-default"]["spec"]["replicas"] == 4
    # no new rollout: the stable Deployment has the ReplicaSet it had, and 3 of its first pods still run
    assert set(_replicasets(cluster, namespace, name)) == stable_rs
    assert len(stable_pods & set(_pods(cluster, namespace, name))) >= 3


def test_a_surge_that_cannot_be_scheduled_is_reported_and_capacity_is_kept(
        cluster: Cluster, operator, namespace: str) -> None:
    # the only L4 node has one GPU: the pod that holds it leaves no room for a surge pod
    base = modelservice("surge", replicas=1, gpus=1, product=L4)
    apply(cluster, namespace, base, server_side=True)
    wait_ready(cluster, namespace, "surge", timeout=120)
    assert deployments(cluster, namespace, "surge")["surge-default"]["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 1, "maxUnavailable": 0}

    apply(cluster, namespace, _changed(base), server_side=True)
    cond = wait_reason(cluster, namespace, "surge", "SurgeUnschedulable", timeout=90)
    assert "Insufficient nvidia.com/gpu" in cond["message"] or "nvidia.com/gpu" in cond["message"]
    assert "maxUnavailable" in cond["message"]
    dep = deployments(cluster, namespace, "surge")["surge-default"]
    assert dep["status"].get("availableReplicas") == 1   # the old pod keeps serving

    # the documented fallback, chosen in the spec: replace in place
    fallback = _changed(base)
    fallback["spec"]["rollout"] = {"maxSurge": 0, "maxUnavailable": 1}
    apply(cluster, namespace, fallback, server_side=True)
    ms = wait_ready(cluster, namespace, "surge", timeout=120)
    assert ms["status"]["readyReplicas"] == 1

    # a canary that cannot be placed: the stable keeps its pod and all the traffic
    canary = _canary("surge", [{"weight": 50}], replicas=1)
    canary["spec"]["resources"] = fallback["spec"]["resources"]
    canary["spec"]["rollout"].update(maxSurge=0, maxUnavailable=1)
    apply(cluster, namespace, _changed(canary, batch=16), server_side=True)
    cond = wait_reason(cluster, namespace, "surge", "SurgeUnschedulable", timeout=90)
    assert "stable revision keeps its 1 pod(s)" in cond["message"]
    assert deployments(cluster, namespace, "surge")["surge-default"]["status"].get("availableReplicas") == 1
    assert _rollout(cluster, namespace, "surge")["canaryWeight"] == 0


def test_the_gateway_canary_example_routes_exact_weights(
        cluster: Cluster, operator, gateway_api: str, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "addons" / "gateway-canary.yaml"))
    ms = wait_ready(cluster, namespace, "embedder-routed", timeout=120)
    revisions = {v["name"]: v["revision"] for v in ms["status"]["variants"]}
    assert _route_weights(cluster, namespace, "embedder-routed") == {
        f"embedder-routed-bf16-{revisions['bf16']}": 8000, f"embedder-routed-int8-{revisions['int8']}": 2000}
    assert [v["trafficShare"] for v in ms["status"]["variants"]] == [80, 20]
    rollout = ms["status"]["rollout"]
    assert (rollout["strategy"], rollout["phase"]) == ("Canary", "Complete")
    assert "canaryRevision" not in rollout and "step" not in rollout


def test_a_restarted_operator_resumes_a_canary_where_status_left_it(
        cluster: Cluster, operator, namespace: str) -> None:
    base = _canary("rs", [{"weight": 50, "pauseSeconds": 3600}], replicas=2)
    apply(cluster, namespace, base, server_side=True)
    wait_ready(cluster, namespace, "rs")
    apply(cluster, namespace, _changed(base), server_side=True)
    ms = _wait_rollout(cluster, namespace, "rs", step=1, canaryWeight=50)
    before = ms["status"]["rollout"]
    canary_rev = ms["status"]["variants"][0]["canaryRevision"]
    assert before["phase"] == "Progressing" and "pausing" in before["message"]
    generations = {n: d["metadata"]["generation"] for n, d in deployments(cluster, namespace, "rs").items()}
    pods = set(_pods(cluster, namespace, "rs"))

    operator.kill()   # SIGKILL in the middle of the pause, then a new process
    operator.start()
    cluster.wait_until(lambda: "pausing" in _rollout(cluster, namespace, "rs").get("message", ""), timeout=30,
                       what="the restarted operator to report the pause")
    time.sleep(8)  # a few of its canary ticks
    after = _rollout(cluster, namespace, "rs")
    assert (after["step"], after["canaryWeight"], after["stepStartedAt"]) == (
        1, 50, before["stepStartedAt"])   # the pause goes on from when it began
    assert {n: d["metadata"]["generation"] for n, d in deployments(cluster, namespace, "rs").items()} == generations
    assert set(_pods(cluster, namespace, "rs")) == pods

    done = _changed(base)
    done["spec"]["rollout"]["steps"][0]["pauseSeconds"] = 0
    apply(cluster, namespace, done, server_side=True)
    ms = _wait_rollout(cluster, namespace, "rs", phase="Complete", timeout=90)
    variant = ms["status"]["variants"][0]
    assert (variant["revision"], variant["deployment"]) == (canary_rev, f"rs-default-{canary_rev}")
