"""The e2e tier's cluster: $KUBECONFIG when it reaches a cluster, else `hack/cluster up`.

Fixtures:
- ``cluster`` (session): a :class:`Cluster` with ``kubeconfig`` and ``kubectl(...)``.
- ``namespace``: a fresh namespace per test, deleted afterwards.

Under ``CI=true`` a missing cluster is a failure, never a skip. When a test fails, the tail of
each component's log is printed (only for a cluster this session started).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, reachable, start_local_cluster, unavailable
from tests.e2e.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env_kubeconfig = os.environ.get("KUBECONFIG")
    if env_kubeconfig and reachable(env_kubeconfig):
        yield Cluster.existing(env_kubeconfig)
        return
    try:
        started = start_local_cluster(REPO)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        message = f"no cluster: hack/cluster up failed: {exc}"
        unavailable(message)
    try:
        yield started
    finally:
        started.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        cluster_obj = funcargs.get("cluster")
        if isinstance(cluster_obj, Cluster):
            report.sections.append(("component logs (tail)", cluster_obj.log_tail()))
        operators = [funcargs.get("operator"), *(funcargs.get("fresh_operator") or [])]
        for i, operator_obj in enumerate(o for o in operators if isinstance(o, OperatorProcess)):
            report.sections.append((f"operator {i} log (tail)", operator_obj.log_tail()))
    return report


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> str:
    """The ModelService CRD installed from crds/ (server-side apply) and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established",
                    "crd/modelservices.kubemaas.io", "--timeout=60s")
    return "modelservices.kubemaas.io"


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crd: str) -> Iterator[OperatorProcess]:
    """The operator as a real process (admin credentials), one per test module: modules run
    one after another, so two operators never reconcile the same objects at once."""
    proc = OperatorProcess(cluster.kubeconfig).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
