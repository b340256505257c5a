"""A ModelService over two nodes against the real KubeRay ray-operator (hack/cluster kuberay).

Without KubeRay's CRDs the ModelService is told what it lacks (MultiNodeControllerMissing); with
them and the ray-operator running, each replica is a RayCluster that KubeRay turns into a head and
a worker pod, placed by the scheduler on the KWOK GPU nodes, and status reports the group.
The ray-operator binary comes from `hack/build-binaries.sh kuberay`; under CI=true its absence
fails the test.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import HACK_CLUSTER, Cluster, unavailable, wait_for
from tests.e2e.msvc import apply, condition, get
from tests.e2e.operator_process import OperatorProcess

KUBERAY_VERSION = "v1.5.0"
KUBERAY_BIN = (Path(os.environ.get("KUBEMAAS_CACHE", Path.home() / ".cache" / "kubemaas"))
               / "bin" / f"kuberay-{KUBERAY_VERSION}" / "ray-operator")
H100 = "NVIDIA-H100-80GB-HBM3"


def big_model(name: str) -> dict:
    return {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": {"name": name},
            "spec": {"model": {"uri": "file:///opt/kubemaas/models/llama-405b", "format": "transformers",
                               "task": "text-generation", "parameterCount": "405B"},
                     "replicas": 1,
                     "resources": {"gpu": {"count": 8, "nodes": 2, "product": H100}, "cpu": "1", "memory": "2Gi"},
                     "runtime": {"engine": "vllm", "image": "kubemaas.test/runtime:1", "maxModelLen": 4096,
                                 "maxNumSeqs": 4, "kvCacheTokens": 8192},
                     "variants": [{"name": "bf16", "quantization": "bf16"}]}}


def surge_model(name: str, nodes: int) -> dict:
    """big_model at 2 GPUs a pod and no fit estimate (nothing refuses it), so the old layout,
    a crash-looping new one and the good one that replaces it all fit on the two 8-GPU nodes at
    once, as a surge-first change of gpu.nodes needs."""
    body = big_model(name)
    del body["spec"]["model"]["parameterCount"]
    body["spec"]["resources"]["gpu"] = {"count": 2, "nodes": nodes, "product": H100}
    return body


def kuberay(cluster: Cluster, action: str) -> None:
    proc = subprocess.run([str(HACK_CLUSTER), "kuberay", action], env=cluster.env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"hack/cluster kuberay {action} failed:\n{proc.stderr}"


@pytest.fixture
def multi_node_operator(cluster: Cluster, crd: str) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, extra_env={"KUBEMAAS_OPERATOR_MULTI_NODE": "true"}).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_without_kuberay_the_model_is_told_what_it_lacks(cluster, namespace, multi_node_operator):
    kuberay(cluster, "down")  # no CRDs (a cluster left with them from an earlier run loses them)
    apply(cluster, namespace, big_model("llm"))

    def missing():
        ready = condition(get(cluster, namespace, "llm"), "Ready")
        return ready if ready and ready.get("reason") == "MultiNodeControllerMissing" else None

    ready = cluster.wait_until(missing, timeout=90, what="Ready=False MultiNodeControllerMissing")
    assert ready["status"] == "False" and "KubeRay" in ready["message"]
    pods = cluster.get_json("pods", "-n", namespace)["items"]
    assert pods == [], "no pod is created for a group without its controller"


@pytest.fixture
def ray_operator(cluster: Cluster) -> Iterator[None]:
    if not KUBERAY_BIN.exists():
        message = f"no ray-operator at {KUBERAY_BIN}: run hack/build-binaries.sh kuberay"
        unavailable(message)
    kuberay(cluster, "up")
    try:
        yield
    finally:
        kuberay(cluster, "down")


def test_a_group_is_a_raycluster_that_kuberay_runs_on_gpu_nodes(cluster, ray_operator, namespace, crd):
    proc = OperatorProcess(cluster.kubeconfig, extra_env={"KUBEMAAS_OPERATOR_MULTI_NODE": "true"}).start()
    try:
        apply(cluster, namespace, big_model("llm"))
        rc = cluster.wait_until(lambda: cluster.get_json("rayclusters", "-n", namespace)["items"],
                                timeout=90, what="the operator's RayCluster")
        assert len(rc) == 1
        name = rc[0]["metadata"]["name"]
        assert cluster.get_json("deployments", "-n", namespace)["items"] == []

        def group_pods():
            pods = cluster.get_json("pods", "-n", namespace, "-l", f"ray.io/cluster={name}")["items"]
            ready = [p for p in pods if p.get("spec", {}).get("nodeName") and any(
                c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))]
            return pods if len(ready) == 2 else None

        def why() -> str:
            return cluster.kubectl("get", "pods,events", "-n", namespace, "-o", "wide", check=False).stdout

        pods = wait_for(group_pods, 120, "KubeRay's head and worker pods, ready", report=why, interval=0.5)
        kinds = sorted(p["metadata"]["labels"].get("ray.io/node-type") for p in pods)
        assert kinds == ["head", "worker"]
        nodes = {p["spec"]["nodeName"] for p in pods}
        assert nodes == {"gpu-h100-0", "gpu-h100-1"}, "each pod takes a whole 8-GPU node"
        for pod in pods:
            limits = pod["spec"]["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "8"

        def group_ready():
            variants = get(cluster, namespace, "llm").get("status", {}).get("variants") or []
            groups = [g for v in variants for g in (v.get("groups") or [])]
            return groups if groups and all(g.get("ready") for g in groups) else None

        groups = cluster.wait_until(group_ready, timeout=90, what="status.variants[].groups ready")
        assert [g["name"] for g in groups] == [name]
        assert groups[0]["nodes"] == 2 and groups[0]["readyNodes"] == 2
    finally:
        proc.stop()


def test_raising_nodes_from_one_keeps_the_deployment_until_the_groups_are_ready(cluster, ray_operator,
                                                                                namespace, crd):
    """resources.gpu.nodes 1 -> 2 rolls surge-first: the one-node Deployment serves until the
    variant's group is ready, and only then is deleted. KWOK readies pods within a second, so a
    group that cannot become ready (a crash-looping image) holds the Deployment first."""
    body = surge_model("grow", nodes=1)
    spec = body["spec"]
    proc = OperatorProcess(cluster.kubeconfig, extra_env={"KUBEMAAS_OPERATOR_MULTI_NODE": "true"}).start()

    def deployments():
        return cluster.get_json("deployments", "-n", namespace)["items"]

    def group_pods():
        pods = cluster.get_json("pods", "-n", namespace, "-l", "kubemaas.io/group-of=grow")["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p.get("status", {}).get("conditions", []))]
        return pods, ready

    try:
        apply(cluster, namespace, body)
        cluster.wait_until(lambda: [d for d in deployments() if d.get("status", {}).get("availableReplicas") == 1],
                           timeout=90, what="the one-node Deployment available")
        spec["resources"]["gpu"]["nodes"] = 2
        spec["runtime"]["image"] = "kubemaas.test/crashloop:1"
        apply(cluster, namespace, body)
        cluster.wait_until(lambda: len([p for p in group_pods()[0] if p.get("status", {}).get("containerStatuses")]) == 2,
                           timeout=90, what="the group's two pods started (crash-looping)")
        time.sleep(3)  # a few rollout ticks: the Deployment must still be there, not deleted
        kept = [d for d in deployments() if not d["metadata"].get("deletionTimestamp")]
        assert len(kept) == 1, "the Deployment stays while no group is ready"
        assert group_pods()[1] == []

        spec["runtime"]["image"] = "kubemaas.test/runtime:1"  # a group that becomes ready
        apply(cluster, namespace, body)

        def deployment_retired():
            deps = deployments()
            if deps and not deps[0]["metadata"].get("deletionTimestamp"):
                return None
            return len(group_pods()[1]) or -1  # ready pods when the Deployment went

        ready = cluster.wait_until(deployment_retired, timeout=180, what="the Deployment retired", interval=0.2)
        # readiness never goes back: the new group was ready before the Deployment was deleted
        assert ready >= 2
        cluster.wait_until(lambda: [g for v in get(cluster, namespace, "grow")["status"].get("variants", [])
                                    for g in v.get("groups") or [] if g.get("ready")],
                           timeout=90, what="status: the group ready")
    finally:
        proc.stop()


def test_lowering_nodes_to_one_keeps_the_groups_until_the_deployment_is_ready(cluster, ray_operator,
                                                                               namespace, crd):
    """resources.gpu.nodes 2 -> 1 rolls surge-first too: the variant's group serves until its
    one-node Deployment is rolled out with its replicas ready, and only then is deleted. KWOK
    readies pods within a second, so a Deployment that cannot become ready (a crash-looping
    image) holds the group first."""
    body = surge_model("shrink", nodes=2)
    spec = body["spec"]
    proc = OperatorProcess(cluster.kubeconfig, extra_env={"KUBEMAAS_OPERATOR_MULTI_NODE": "true"}).start()

    def live_clusters():
        return [rc for rc in cluster.get_json("rayclusters", "-n", namespace)["items"]
                if not rc["metadata"].get("deletionTimestamp")]

    def deployment_available() -> int:
        deps = cluster.get_json("deployments", "-n", namespace)["items"]
        return sum(d.get("status", {}).get("availableReplicas", 0) for d in deps)

    def one_node_pods():
        return cluster.get_json("pods", "-n", namespace, "-l",
                                "kubemaas.io/modelservice=shrink,!kubemaas.io/group")["items"]

    def variant_status() -> dict:
        return (get(cluster, namespace, "shrink").get("status", {}).get("variants") or [{}])[0]

    try:
        apply(cluster, namespace, body)
        cluster.wait_until(lambda: [g for g in variant_status().get("groups") or [] if g.get("ready")],
                           timeout=120, what="status: the group over two nodes ready")
        (group,) = live_clusters()
        spec["resources"]["gpu"]["nodes"] = 1
        spec["runtime"]["image"] = "kubemaas.test/crashloop:1"
        apply(cluster, namespace, body)
        cluster.wait_until(lambda: [p for p in one_node_pods() if p.get("status", {}).get("containerStatuses")],
                           timeout=90, what="the one-node Deployment's pod started (crash-looping)")
        time.sleep(3)  # a few rollout ticks: the group must still be there, not deleted
        assert [rc["metadata"]["name"] for rc in live_clusters()] == [group["metadata"]["name"]], \
            "the RayCluster stays while the Deployment has no ready replica"
        assert deployment_available() == 0
        rollout = get(cluster, namespace, "shrink")["status"]["rollout"]
        assert rollout["phase"] == "Progressing" and "keep serving until Deployment shrink-bf16" in rollout["message"]
        assert [g["name"] for g in variant_status().get("groups") or []] == [group["metadata"]["name"]]

        spec["runtime"]["image"] = "kubemaas.test/runtime:1"  # a Deployment that becomes ready
        apply(cluster, namespace, body)

        def group_retired():
            if live_clusters():
                return None
            return deployment_available() or -1  # available replicas when the group went

        available = cluster.wait_until(group_retired, timeout=180, what="the RayCluster retired", interval=0.2)
        # availability never goes back here: the Deployment was ready before the group was deleted
        assert available >= 1
        cluster.wait_until(lambda: get(cluster, namespace, "shrink")["status"].get("rollout", {}).get("phase")
                           == "Complete" and not variant_status().get("groups"),
                           timeout=90, what="status: rollout Complete, no group left")
    finally:
        proc.stop()
