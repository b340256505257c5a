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

from tests.e2e.cluster import Cluster, start_local_cluster, reachable

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
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield started
    finally:
        started.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        cluster_obj = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
        if isinstance(cluster_obj, Cluster):
            report.sections.append(("component logs (tail)", cluster_obj.log_tail()))
    return report


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
