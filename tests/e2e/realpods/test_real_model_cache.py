"""The node-local model cache (`spec.model.cache: node`) on the real node: the first pod's fetch
step fills the node's copy from S3, the second pod on that node starts without a fetch, and
serves.

The operator runs as a pod (the chart with `modelCache.enabled` and `modelCache.path` a fresh
folder owned by 65532; the node labelled kubemaas.io/model-cache=true, as docs/api.md asks the
admin). MiniLM comes from moto's S3 server on the host (tests/e2e/realpods/node_cache.py says
why): one replica's `fetch-model` init container reports `KubemaasCache: {"cache": "filled",
...}` with the model's bytes, and the node's folder holds the files. Then the S3 server is
stopped, so any fetch would fail; the ModelService is scaled to 2, and the second pod's fetch
step reports a hit (and logs it), with the same entry. The first pod is then deleted, so only
pods started from the cache remain, and tritonclient through the Service gets
sentence-transformers' embeddings. Assertions are on the fetch step's termination message and
logs, never on time (bench/cache measures the time).

Its own module: its operator release has the model cache on, and only one operator runs at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubemaas_operator.builders.model_cache import cache_key, cache_volume_name
from kubemaas_operator.builders.naming import FETCH_CONTAINER
from kubemaas_runtime.fetch_cache import MARKER

from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.msvc import get
from tests.e2e.realpods.conftest import (
    Images,
    OperatorRelease,
    installed_operator,
    restricted_namespace,
)
from tests.e2e.realpods.node_cache import (
    S3StandIn,
    cache_chart_args,
    cache_node,
    cached_modelservice,
    create_secret,
    fetch_report,
    node_internal_ip,
    unique_bucket,
)
from tests.e2e.realpods.test_real_pods import (
    READY_TIMEOUT,
    apply,
    assert_serves_minilm_embeddings,
    minilm_dir,
    report,
    runtime_pods,
    wait_ready,
)

# the cluster, two images, the operator and three MiniLM pods: past the default 900 s
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NAME = "minilm-cached"
SECRET = "s3-stand-in"
MINILM = {"format": "transformers", "task": "feature-extraction"}
RESOURCES = {"cpu": "250m", "memory": "1536Mi"}


@pytest.fixture(scope="module")
def cache_root(cluster: Cluster, real_node: str) -> Iterator[Path]:
    with cache_node(cluster, real_node) as root:
        yield root


@pytest.fixture(scope="module")
def cache_release(cluster: Cluster, crd: str, images: Images, real_node: str,
                  cache_root: Path) -> Iterator[OperatorRelease]:
    with installed_operator(cluster, images, *cache_chart_args(cache_root)) as release:
        yield release


@pytest.fixture
def s3(cluster: Cluster, real_node: str) -> Iterator[S3StandIn]:
    server = S3StandIn(node_internal_ip(cluster, real_node))
    try:
        yield server
    finally:
        server.stop()


def fetch_logs(cluster: Cluster, namespace: str, pod: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, pod, "-c", FETCH_CONTAINER).stdout


def test_a_second_pod_on_the_node_starts_from_the_cache_without_a_fetch(
        cluster: Cluster, cache_release: OperatorRelease, cache_root: Path, s3: S3StandIn,
        real_node: str):
    namespace = restricted_namespace(cluster, "rp-cache")
    diagnostics = report(cluster, namespace, cache_release)
    try:
        uri, size = s3.upload(unique_bucket("cache-e2e"), "minilm", minilm_dir())
        key = cache_key(uri)
        create_secret(cluster, namespace, SECRET, s3.secret_env())
        apply(cluster, namespace, cached_modelservice(NAME, uri, SECRET, MINILM, RESOURCES))
        wait_ready(cluster, namespace, NAME, cache_release)

        # the first pod filled the node's copy from S3
        (first,) = runtime_pods(cluster, namespace, NAME)
        assert first["spec"]["nodeName"] == real_node
        filled = fetch_report(first)
        assert filled == {"cache": "filled", "key": key, "uri": uri, "revision": "", "bytes": size}, \
            diagnostics()
        assert f"cache filled: fetched {uri} into /cache/{key} ({size} bytes" in \
            fetch_logs(cluster, namespace, first["metadata"]["name"])
        entry = cache_root / key
        source = minilm_dir()
        on_node = {p.relative_to(entry).as_posix(): p.stat().st_size
                   for p in entry.rglob("*") if p.is_file() and p.name != MARKER}
        assert on_node == {p.relative_to(source).as_posix(): p.stat().st_size
                           for p in source.rglob("*") if p.is_file()}
        assert (entry / MARKER).is_file()

        # no S3 any more: a pod that fetched could not start
        s3.stop()
        cluster.kubectl("patch", "msvc", NAME, "-n", namespace, "--type=merge",
                        "-p", '{"spec": {"replicas": 2}}')

        def two_ready() -> bool:
            status = get(cluster, namespace, NAME).get("status", {})
            return status.get("readyReplicas") == 2 and len(runtime_pods(cluster, namespace, NAME)) == 2

        wait_for(two_ready, READY_TIMEOUT, f"{namespace}/{NAME} with 2 ready replicas", diagnostics,
                 interval=2)
        (second,) = [p for p in runtime_pods(cluster, namespace, NAME)
                     if p["metadata"]["name"] != first["metadata"]["name"]]
        assert second["spec"]["nodeName"] == real_node
        hit = fetch_report(second)
        assert hit == {"cache": "hit", "key": key, "uri": uri, "revision": "", "bytes": size}, diagnostics()
        second_log = fetch_logs(cluster, namespace, second["metadata"]["name"])
        assert f"cache hit: {uri} is on this node at /cache/{key} ({size} bytes" in second_log
        assert "skipping the fetch" in second_log and "cache filled" not in second_log

        # only pods started from the cache behind the Service: they serve
        cluster.kubectl("delete", "pod", "-n", namespace, first["metadata"]["name"], "--wait=true",
                        "--timeout=180s", timeout=200)
        assert_serves_minilm_embeddings(cluster, namespace, NAME, source)
        reports = [fetch_report(p) for p in runtime_pods(cluster, namespace, NAME)]
        assert all(r is None or r["cache"] == "hit" for r in reports), reports  # the replacement too
    finally:
        s3.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s",
                        check=False, timeout=200)
        # the cache's PV is cluster-scoped and Retain: the namespace took its claim, not it
        cluster.kubectl("delete", "pv", cache_volume_name(namespace, NAME), "--wait=false", check=False)
