"""Proof that the local control plane is real: scheduling, taints, GC, CEL, versions."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.e2e.cluster import Cluster

pytestmark = pytest.mark.e2e


def _deployment(name: str, replicas: int, gpus: int = 0, tolerate_gpu: bool = False) -> dict:
    container: dict = {"name": "main", "image": "registry.invalid/pause:1"}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    pod_spec: dict = {"containers": [container]}
    if tolerate_gpu:
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def _apply(cluster: Cluster, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _pods(cluster: Cluster, namespace: str, app: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"app={app}")["items"]


def _node_labels(cluster: Cluster) -> dict[str, dict[str, str]]:
    nodes = cluster.get_json("nodes")["items"]
    return {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in nodes}


def test_server_reports_its_real_version(cluster: Cluster) -> None:
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    server = out["serverVersion"]["gitVersion"]
    assert re.fullmatch(r"v1\.\d+\.\d+", server), server
    assert server == out["clientVersion"]["gitVersion"]


def test_simulated_nodes_advertise_gpus_as_feature_discovery_would(cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    h100 = [n for n in nodes.values()
            if n["metadata"]["labels"].get("nvidia.com/gpu.product") == "NVIDIA-H100-80GB-HBM3"]
    assert len(h100) >= 2
    for node in h100:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
    ready = [n for n in nodes.values()
             if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])]
    assert len(ready) == len(nodes) >= 5


def test_two_gpu_pods_land_only_on_h100_nodes_and_become_available(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, namespace, _deployment("gpu2", replicas=3, gpus=2, tolerate_gpu=True))
    cluster.wait_until(
        lambda: cluster.get_json("deployment", "gpu2", "-n", namespace)["status"].get("availableReplicas") == 3,
        timeout=90, what="deployment gpu2 available",
    )
    labels = _node_labels(cluster)
    pods = _pods(cluster, namespace, "gpu2")
    assert len(pods) == 3
    for pod in pods:
        node = pod["spec"]["nodeName"]
        assert labels[node].get("nvidia.com/gpu.product") == "NVIDIA-H100-80GB-HBM3", node


def test_more_gpus_than_any_node_stays_pending_with_the_schedulers_reason(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, namespace, _deployment("gpu16", replicas=1, gpus=16, tolerate_gpu=True))

    def unschedulable_message() -> str | None:
        for pod in _pods(cluster, namespace, "gpu16"):
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond["status"] == "False":
                    return cond.get("message")
        return None

    message = cluster.wait_until(unschedulable_message, timeout=60, what="PodScheduled=False")
    assert "Insufficient nvidia.com/gpu" in message
    (pod,) = _pods(cluster, namespace, "gpu16")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_pods_without_the_gpu_toleration_never_land_on_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, namespace, _deployment("cpu", replicas=8))
    cluster.wait_until(
        lambda: cluster.get_json("deployment", "cpu", "-n", namespace)["status"].get("availableReplicas") == 8,
        timeout=90, what="deployment cpu available",
    )
    labels = _node_labels(cluster)
    for pod in _pods(cluster, namespace, "cpu"):
        assert "nvidia.com/gpu.present" not in labels[pod["spec"]["nodeName"]]


def test_deleting_an_owner_garbage_collects_its_dependents(cluster: Cluster, namespace: str) -> None:
    _apply(cluster, namespace, _deployment("gc", replicas=2))
    cluster.wait_until(lambda: len(_pods(cluster, namespace, "gc")) == 2, timeout=60, what="2 pods")
    assert cluster.get_json("replicasets", "-n", namespace, "-l", "app=gc")["items"]
    cluster.kubectl("delete", "deployment", "gc", "-n", namespace, "--cascade=background")
    cluster.wait_until(
        lambda: not cluster.get_json("replicasets", "-n", namespace, "-l", "app=gc")["items"]
        and not _pods(cluster, namespace, "gc"),
        timeout=90, what="replicasets and pods collected",
    )


CEL_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: celprobes.e2e.kubemaas.io}
spec:
  group: e2e.kubemaas.io
  scope: Namespaced
  names: {plural: celprobes, singular: celprobe, kind: CelProbe}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              min: {type: integer}
              max: {type: integer}
            x-kubernetes-validations:
            - rule: self.min <= self.max
              message: spec.min must not exceed spec.max
"""


def test_a_cel_rule_refuses_an_object_on_server_side_dry_run(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "-", input=CEL_CRD)
    cluster.kubectl("wait", "--for=condition=Established", "crd/celprobes.e2e.kubemaas.io", "--timeout=60s")

    def probe(lo: int, hi: int) -> str:
        return yaml.safe_dump({"apiVersion": "e2e.kubemaas.io/v1", "kind": "CelProbe",
                               "metadata": {"name": "p"}, "spec": {"min": lo, "max": hi}})

    # a freshly established CRD can take a moment to be served
    cluster.wait_until(
        lambda: cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-",
                                input=probe(1, 2), check=False).returncode == 0,
        timeout=30, what="valid CelProbe accepted",
    )
    refused = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-",
                              input=probe(3, 2), check=False)
    assert refused.returncode != 0
    assert "spec.min must not exceed spec.max" in refused.stderr
    assert not cluster.get_json("celprobes.e2e.kubemaas.io", "-n", namespace)["items"]
