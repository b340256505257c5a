"""The GPU-fit check with the operator restricted to one namespace (`watchNamespaces`): Nodes are
cluster-scoped, and the operator still reads them, so it refuses and places as cluster-wide."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.msvc import apply, deployments, wait_ready, wait_reason
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_gpufit import llm, node_labels, running_node

pytestmark = pytest.mark.e2e


@pytest.fixture
def scoped_operator(cluster: Cluster, crd: str, namespace: str) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, extra_env={"KUBEMAAS_OPERATOR_NAMESPACES": namespace}).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_a_namespaced_operator_knows_the_clusters_gpus(cluster: Cluster, scoped_operator, namespace: str) -> None:
    apply(cluster, namespace, llm("fits", "13B", "bf16"))
    apply(cluster, namespace, llm("too-big", "70B", "fp16"))
    wait_ready(cluster, namespace, "fits", timeout=120)
    assert node_labels(cluster)[running_node(cluster, namespace, "fits")]["nvidia.com/gpu.product"] \
        == "NVIDIA-H100-80GB-HBM3"
    cond = wait_reason(cluster, namespace, "too-big", "GPUMemoryInsufficient", timeout=60)
    assert "the largest NVIDIA-H100-80GB-HBM3 has 79 GiB" in cond["message"]
    assert deployments(cluster, namespace, "too-big") == {}
