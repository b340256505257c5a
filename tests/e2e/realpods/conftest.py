"""The real-pod tier's fixtures: the local cluster's real node (hack/real-node.sh), the images
hack/images builds (the operator's in full, the runtime's light) imported into it, and the operator installed by the Helm chart
as a pod on that node, running with nothing but the chart's ServiceAccount.

Under CI=true a missing real node is a failure, never a skip; elsewhere (KUBEMAAS_REAL_NODE=0,
an existing cluster without one) the tier is skipped. Every wait has a timeout and prints what
the pods and the operator said when it runs out.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.cluster import HACK_CLUSTER, Cluster
from tests.e2e.realpods.images import images_cli
from tests.unit.chart import CHART, helm

REAL_NODE_LABEL = "kubemaas.io/real-node"
ON_REAL_NODE = {
    "nodeSelector": {REAL_NODE_LABEL: "true"},
    "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"
IMAGE_TIMEOUT = 900  # a cold base image: mmdebstrap downloads Debian's python3


def _fail_or_skip(message: str) -> None:
    """Skip only where the developer left the real node out on purpose (KUBEMAAS_REAL_NODE=0,
    e.g. a second cluster on a machine whose real node another checkout holds), never in CI;
    a node that should have come up and did not is a failure."""
    if os.environ.get("KUBEMAAS_REAL_NODE") == "0" and os.environ.get("CI") != "true":
        pytest.skip(f"KUBEMAAS_REAL_NODE=0 leaves the real node out: {message}")
    pytest.fail(message)


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> str:
    nodes = cluster.get_json("nodes", "-l", f"{REAL_NODE_LABEL}=true")["items"]
    for node in nodes:
        conditions = node.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return node["metadata"]["name"]
    _fail_or_skip("no Ready node labelled kubemaas.io/real-node=true: `hack/cluster up` starts one "
                  "unless KUBEMAAS_REAL_NODE=0 (docs/local-cluster.md)")
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Images:
    runtime: str
    operator: str
    archives: dict[str, Path]


@pytest.fixture(scope="session")
def images(real_node: str) -> Images:
    return build_and_load_images()


def build_and_load_images() -> Images:
    """The operator's full image (its dependencies are small) and the runtime's light one (torch
    stays in .venv, mounted by the node), built by hack/images and imported into the node."""
    images_cli("build", "operator", timeout=IMAGE_TIMEOUT)
    images_cli("build", "--light", "runtime", timeout=IMAGE_TIMEOUT)
    archives = {"operator": Path(images_cli("archive", "operator")),
                "runtime": Path(images_cli("archive", "--light", "runtime"))}
    load = subprocess.run([str(HACK_CLUSTER), "load", *map(str, archives.values())],
                          capture_output=True, text=True, timeout=300, check=False)
    assert load.returncode == 0, f"hack/cluster load failed:\n{load.stderr}"
    return Images(runtime=images_cli("ref", "--light", "runtime"),
                  operator=images_cli("ref", "operator"), archives=archives)


def restricted_namespace(cluster: Cluster, prefix: str) -> str:
    """A namespace whose pods the API server admits only under the restricted Pod Security
    Standard."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, RESTRICTED, "pod-security.kubernetes.io/enforce-version=latest")
    return name


def pods_report(cluster: Cluster, namespace: str) -> str:
    """What a failed wait prints: the pods, their events and the last log lines."""
    parts = [cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout,
             cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp",
                             check=False).stdout[-4000:]]
    for pod in cluster.get_json("pods", "-n", namespace)["items"]:
        name = pod["metadata"]["name"]
        statuses = json.dumps(pod.get("status", {}).get("containerStatuses", []))[:1500]
        logs = cluster.kubectl("logs", "-n", namespace, name, "--all-containers", "--tail=30",
                               check=False)
        parts.append(f"--- {name}: {statuses}\n{logs.stdout}{logs.stderr}")
    return "\n".join(parts)


@dataclass
class OperatorRelease:
    cluster: Cluster
    release: str
    namespace: str

    @property
    def service_account(self) -> str:
        return f"{self.release}-kubemaas"

    def pods(self) -> list[dict]:
        return self.cluster.get_json("pods", "-n", self.namespace, "-l",
                                     f"app.kubernetes.io/instance={self.release}")["items"]

    def logs(self) -> str:
        out = self.cluster.kubectl("logs", "-n", self.namespace, f"deployment/{self.service_account}",
                                   "--tail=60", check=False)
        return out.stdout + out.stderr


@pytest.fixture(scope="module")
def operator_release(cluster: Cluster, crd: str, images: Images, real_node: str) -> Iterator[OperatorRelease]:
    """charts/kubemaas installed with the local images (pullPolicy Never) on the real node."""
    with installed_operator(cluster, images) as release:
        yield release


@contextlib.contextmanager
def installed_operator(cluster: Cluster, images: Images, *extra: str) -> Iterator[OperatorRelease]:
    """The chart installed as ``rp`` in a restricted namespace, with ``extra`` helm arguments
    (e.g. ``--set operator.runtimeImages.vllm=...``); uninstalled on exit."""
    namespace = restricted_namespace(cluster, "kubemaas-rp")
    release = OperatorRelease(cluster, "rp", namespace)
    repo, tag = images.operator.rsplit(":", 1)
    image = {"repository": repo, "tag": tag, "pullPolicy": "Never"}
    args = ["install", release.release, str(CHART), "--namespace", namespace,
            "--set", "crds.install=false",  # the session's crd fixture applied it
            "--set-json", f"image={json.dumps(image)}",
            "--set", f"operator.runtimeImage={images.runtime}", "--set", "operator.logFormat=text",
            "--set-json", f"nodeSelector={json.dumps(ON_REAL_NODE['nodeSelector'])}",
            "--set-json", f"tolerations={json.dumps(ON_REAL_NODE['tolerations'])}", *extra]
    helm(*args, env=cluster.env, timeout=120)
    try:
        rollout = cluster.kubectl("rollout", "status", "-n", namespace,
                                  f"deployment/{release.service_account}", "--timeout=180s",
                                  check=False, timeout=200)
        assert rollout.returncode == 0, (
            f"the operator pod did not become available:\n{rollout.stderr}\n{pods_report(cluster, namespace)}")
        yield release
    finally:
        helm("uninstall", release.release, "--namespace", namespace, "--wait", "--timeout", "120s",
             env=cluster.env, check=False, timeout=150)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


