"""What the real-node model cache test (test_real_model_cache.py), its benchmark (bench/cache)
and the real part of `make demo` (hack/demo-real.py) share: an S3 stand-in the real node's pods can reach, the node's cache folder and
label as docs/api.md asks the cluster admin for them, the ModelService, and what a pod's fetch
step reported and when.

- **The S3 stand-in** is moto's server (as tests/runtime/test_fetch.py uses it), bound to the
  real node's InternalIP, the host's own address, which its pods reach through the CNI bridge:
  `spec.model.cache` takes only s3:// and hf:// (a pvc:// or file:// model is already local), and
  no real bucket is reachable here. Its endpoint and keys reach the fetch step the way real ones
  do, through `spec.model.secretRef`.
- **The cache folder** is a fresh folder on this machine (the real node is this machine), owned
  by 65532 (the runtime's uid and fsGroup), given to the chart as `modelCache.path`; the node
  gets `kubemaas.io/model-cache=true`. A fresh folder per run, so the first pod can only fill.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kubemaas_operator.builders.naming import FETCH_CONTAINER
from kubemaas_runtime.fetch_cache import REPORT_PREFIX

from tests.e2e.cluster import Cluster
from tests.e2e.realpods.conftest import ON_REAL_NODE
from tests.ports import free_port

CACHE_NODE_LABEL = "kubemaas.io/model-cache"  # the chart's modelCache.nodeLabel default
APP_UID = 65532
S3_KEYS = {"AWS_ACCESS_KEY_ID": "cache-e2e", "AWS_SECRET_ACCESS_KEY": "cache-e2e-secret",
           "AWS_REGION": "us-east-1"}


def node_internal_ip(cluster: Cluster, node: str) -> str:
    addresses = cluster.get_json("node", node)["status"]["addresses"]
    return next(a["address"] for a in addresses if a["type"] == "InternalIP")


class S3StandIn:
    """moto's S3 server on ``host``:a free port, until stop() (after which a fetch from it can
    only fail: connection refused)."""

    def __init__(self, host: str) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self.endpoint = f"http://{host}:{free_port()}"
        self._server = ThreadedMotoServer(ip_address=host, port=int(self.endpoint.rsplit(":", 1)[1]),
                                          verbose=False)
        self._server.start()
        self.running = True

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_KEYS["AWS_REGION"],
                            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])

    def upload(self, bucket: str, prefix: str, folder: Path) -> tuple[str, int]:
        """Every file under ``folder`` as s3://bucket/prefix/<relative path>; (uri, bytes)."""
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        total = 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
            total += path.stat().st_size
        return f"s3://{bucket}/{prefix}", total

    def secret_env(self) -> dict[str, str]:
        """What the fetch step needs, as the Secret `spec.model.secretRef` names."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False


def create_secret(cluster: Cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
              "type": "Opaque", "stringData": data}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(secret))


def prepare_cache_node(cluster: Cluster, node: str, root: Path) -> None:
    """What docs/api.md asks the cluster admin for: the cache folder ``root`` (made if missing)
    owned by the runtime's uid, and ``node`` labelled as the cache's node group. `make demo`
    uses it too (hack/demo-real.py), with the folder the operator it runs is told."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    os.chown(root, APP_UID, APP_UID)
    cluster.kubectl("label", "node", node, f"{CACHE_NODE_LABEL}=true", "--overwrite")


@contextlib.contextmanager
def cache_node(cluster: Cluster, node: str) -> Iterator[Path]:
    """A fresh cache folder owned by the runtime's uid, and ``node`` labelled as the cache's node
    group; the label and the folder removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kubemaas-model-cache-"))
    prepare_cache_node(cluster, node, root)
    try:
        yield root
    finally:
        cluster.kubectl("label", "node", node, f"{CACHE_NODE_LABEL}-", check=False)
        shutil.rmtree(root, ignore_errors=True)


def cache_chart_args(root: Path) -> tuple[str, ...]:
    return ("--set", "modelCache.enabled=true", "--set", f"modelCache.path={root}")


def cached_modelservice(name: str, uri: str, secret: str, model: dict[str, Any],
                        resources: dict[str, str], *, replicas: int = 1,
                        runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelService", "metadata": {"name": name},
        "spec": {
            "model": {"uri": uri, **model, "cache": "node", "secretRef": {"name": secret}},
            "replicas": replicas,
            "resources": resources,
            "runtime": runtime or {},
            "scheduling": ON_REAL_NODE,
        },
    }


def unique_bucket(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fetch_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The fetch init container's status, or None before the kubelet reports it."""
    for status in pod.get("status", {}).get("initContainerStatuses", []):
        if status["name"] == FETCH_CONTAINER:
            return status
    return None


def fetch_report(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The fetch step's `KubemaasCache: {...}` termination message, parsed; None until it has
    finished (or when it wrote none)."""
    status = fetch_status(pod) or {}
    done = (status.get("state") or {}).get("terminated") or {}
    for line in (done.get("message") or "").splitlines():
        if line.startswith(REPORT_PREFIX):
            report: dict[str, Any] = json.loads(line[len(REPORT_PREFIX):])
            return report
    return None


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


@dataclass(frozen=True)
class PodStartup:
    """One pod's start, from the API server's timestamps (whole seconds), each from the pod's
    metadata.creationTimestamp."""

    pod: str
    cache: str  # the fetch step's report: "filled" or "hit"
    bytes: int
    scheduled_s: float  # -> the PodScheduled condition (a new claim's binding is waited for here)
    fetch_started_s: float  # -> the fetch container's startedAt (volumes mounted, sandbox up)
    fetch_s: float  # the fetch container's startedAt -> finishedAt
    ready_s: float  # -> the Ready condition's transition: the whole start-up

    @property
    def load_s(self) -> float:
        """The fetch's end -> Ready: the runtime's model load and warm-up."""
        return self.ready_s - self.fetch_started_s - self.fetch_s

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodStartup:
        report = fetch_report(pod)
        assert report is not None, f"{pod['metadata']['name']}: no KubemaasCache report"
        done = (fetch_status(pod) or {})["state"]["terminated"]
        conditions = {c["type"]: c for c in pod["status"]["conditions"]}
        assert conditions["Ready"]["status"] == "True", conditions["Ready"]
        created = _time(pod["metadata"]["creationTimestamp"])

        def since(stamp: str) -> float:
            return (_time(stamp) - created).total_seconds()

        return cls(pod["metadata"]["name"], report["cache"], int(report["bytes"]),
                   since(conditions["PodScheduled"]["lastTransitionTime"]), since(done["startedAt"]),
                   since(done["finishedAt"]) - since(done["startedAt"]),
                   since(conditions["Ready"]["lastTransitionTime"]))
