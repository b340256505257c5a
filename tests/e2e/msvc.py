"""Small helpers the operator e2e tests share: ModelService manifests and waits."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
TWO_VARIANTS = [{"name": "a", "quantization": "none", "weight": 75},
                {"name": "b", "quantization": "bf16", "weight": 25}]


def modelservice(name: str, *, replicas: int = 1, gpus: int = 0, product: str | None = None,
                 variants: list[dict] | None = None, image: str | None = None,
                 uri: str = "file:///opt/kubemaas/models/all-MiniLM-L6-v2",
                 cpu: str = "1", memory: str = "2Gi") -> dict[str, Any]:
    gpu: dict[str, Any] = {"count": gpus}
    if product:
        gpu["product"] = product
    spec: dict[str, Any] = {
        "model": {"uri": uri, "format": "transformers", "task": "feature-extraction"},
        "replicas": replicas,
        "resources": {"gpu": gpu, "cpu": cpu, "memory": memory},
    }
    if variants:
        spec["variants"] = variants
    if image:
        spec["runtime"] = {"image": image}
    return {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService",
            "metadata": {"name": name}, "spec": spec}


def apply(cluster: Cluster, namespace: str, obj: dict, *, server_side: bool = False) -> None:
    args = ["apply", "-n", namespace, "-f", "-"]
    if server_side:
        args.insert(1, "--server-side")
    cluster.kubectl(*args, input=json.dumps(obj))


def get(cluster: Cluster, namespace: str, name: str) -> dict:
    return cluster.get_json("msvc", name, "-n", namespace)


def condition(ms: dict, ctype: str) -> dict | None:
    for cond in ms.get("status", {}).get("conditions", []):
        if cond["type"] == ctype:
            return cond
    return None


def wait_ready(cluster: Cluster, namespace: str, name: str, timeout: float = 90) -> dict:
    """Ready=True for the ModelService's current generation."""

    def ready() -> dict | None:
        ms = get(cluster, namespace, name)
        cond = condition(ms, "Ready")
        current = ms.get("status", {}).get("observedGeneration") == ms["metadata"]["generation"]
        return ms if cond and cond["status"] == "True" and current else None

    return cluster.wait_until(ready, timeout=timeout, what=f"{namespace}/{name} Ready")


def wait_reason(cluster: Cluster, namespace: str, name: str, reason: str, timeout: float = 60) -> dict:
    """Ready=False with ``reason``; returns the condition."""

    def found() -> dict | None:
        cond = condition(get(cluster, namespace, name), "Ready")
        return cond if cond and cond["status"] == "False" and cond["reason"] == reason else None

    return cluster.wait_until(found, timeout=timeout, what=f"{namespace}/{name} Ready=False/{reason}")


def deployments(cluster: Cluster, namespace: str, name: str) -> dict[str, dict]:
    items = cluster.get_json("deployments", "-n", namespace,
                             "-l", f"kubemaas.io/modelservice={name}")["items"]
    return {d["metadata"]["name"]: d for d in items}


def replicasets(cluster: Cluster, namespace: str, name: str) -> set[str]:
    items = cluster.get_json("replicasets", "-n", namespace,
                             "-l", f"kubemaas.io/modelservice={name}")["items"]
    return {rs["metadata"]["name"] for rs in items}


def with_changes(obj: dict, **spec_changes: Any) -> dict:
    out = copy.deepcopy(obj)
    out["spec"].update(spec_changes)
    return out


def example_claims(examples: list[dict]) -> set[str]:
    """The PersistentVolumeClaims the pvc:// examples read from."""
    return {ex["spec"]["model"]["uri"].removeprefix("pvc://").split("/")[0]
            for ex in examples if ex["spec"]["model"]["uri"].startswith("pvc://")}


def static_claim(cluster: Cluster, namespace: str, claim: str) -> None:
    """A claim bound to a static hostPath volume (no provisioner runs here), as `hack/cluster pvc`."""
    volume = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": f"{namespace}-{claim}", "labels": {"kubemaas.io/local-pv": "true"}},
              "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                       "hostPath": {"path": f"/var/lib/kubemaas/{namespace}/{claim}"},
                       "claimRef": {"namespace": namespace, "name": claim}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
           "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": f"{namespace}-{claim}",
                    "resources": {"requests": {"storage": "10Gi"}}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [volume, pvc]}))


def load_examples() -> list[dict]:
    docs = []
    for path in EXAMPLES:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "ModelService")
    return docs
