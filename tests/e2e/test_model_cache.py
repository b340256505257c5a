"""spec.model.cache node on the local control plane: the operator's local PV and claim bind, and
its pods land only on the cache's node group (the PV's required node affinity, through the real
scheduler). The fetch skip on a second pod is the runtime's (tests/runtime/test_fetch.py)."""

from __future__ import annotations

import json

import pytest
from kubemaas_operator.builders import build_children
from kubemaas_operator.settings import OperatorSettings

from tests.e2e.cluster import Cluster
from tests.unit.support import make_ms

pytestmark = pytest.mark.e2e

LABEL = "kubemaas.io/model-cache"


def _untainted_node(cluster: Cluster) -> str:
    nodes = [n for n in cluster.get_json("nodes")["items"] if not n["spec"].get("taints")]
    assert nodes, "the local cluster has an untainted node"
    return min(n["metadata"]["name"] for n in nodes)


def test_cached_pods_bind_the_local_volume_and_land_on_the_cache_nodes(cluster: Cluster, namespace: str) -> None:
    node = _untainted_node(cluster)
    cluster.kubectl("label", "node", node, f"{LABEL}=true", "--overwrite")
    ms = make_ms({"model": {"uri": "hf://org/m@abc123", "format": "transformers", "task": "feature-extraction",
                            "cache": "node"}, "replicas": 2}, namespace=namespace)
    settings = OperatorSettings(model_cache=True)
    objs = [o for o in build_children(ms, settings, runtime_image="registry.invalid/pause:1")
            if o["kind"] in ("PersistentVolume", "PersistentVolumeClaim", "Deployment")]
    volume = next(o for o in objs if o["kind"] == "PersistentVolume")
    for obj in objs:
        obj["metadata"].pop("ownerReferences", None)  # no ModelService object in this test
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    try:
        claim = volume["spec"]["claimRef"]["name"]
        cluster.wait_until(
            lambda: cluster.get_json("pvc", claim, "-n", namespace)["status"].get("phase") == "Bound",
            timeout=60, what="the cache claim bound")
        def scheduled() -> list[str]:
            pods = cluster.get_json("pods", "-n", namespace, "-l", "kubemaas.io/modelservice=m")["items"]
            return [p["spec"].get("nodeName", "") for p in pods]
        cluster.wait_until(lambda: len(scheduled()) == 2 and all(scheduled()), timeout=90, what="2 pods scheduled")
        assert set(scheduled()) == {node}  # the only node of the group: both replicas share its copy
    finally:
        cluster.kubectl("delete", "pv", volume["metadata"]["name"], "--wait=false", check=False)
        cluster.kubectl("label", "node", node, f"{LABEL}-", check=False)
