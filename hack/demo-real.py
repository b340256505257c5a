#!/usr/bin/env python3
"""The Python half of `make demo`'s node-cache and LoRA part (hack/demo-real.sh runs it), made of
the real-node tests' own helpers, never copies of them:

    hack/demo-real.py s3 NAMESPACE NODE CACHE_ROOT READY_FILE
        the node's cache folder and label (tests/e2e/realpods/node_cache.py prepare_cache_node),
        moto's S3 server on NODE's InternalIP (node_cache.S3StandIn, as test_real_model_cache.py
        starts it), MiniLM uploaded to a fresh bucket (so a fresh cache entry: the first pod can
        only fill), a LoRA for SmolLM2 made here with peft (tests/runtime/lora_adapters.py
        build_adapter, on hack/smollm2-transformers's directory, as test_lora_smollm2.py makes
        it) uploaded to s3://demo-adapters/smollm2-lora, and the Secret `s3-stand-in` (endpoint
        and keys) in NAMESPACE; writes {"minilm", "adapter"} (their s3:// URIs) to READY_FILE
        and serves until SIGTERM (hack/demo down).
    hack/demo-real.py reports NAMESPACE NAME
        each pod of ModelService NAME: its node, the fetch step's `KubemaasCache:` report
        (node_cache.fetch_report) and the fetch step's own log line about the cache.

Run it with the project's .venv python; KUBECONFIG names the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubemaas_operator.builders.naming import FETCH_CONTAINER

from tests.e2e.cluster import Cluster
from tests.e2e.realpods.node_cache import (
    S3StandIn,
    create_secret,
    fetch_report,
    node_internal_ip,
    prepare_cache_node,
    unique_bucket,
)
from tests.e2e.realpods.test_real_pods import minilm_dir, runtime_pods

SECRET = "s3-stand-in"
ADAPTER_BUCKET, ADAPTER_KEY = "demo-adapters", "smollm2-lora"


def serve_s3(namespace: str, node: str, cache_root: str, ready_file: str) -> None:
    from tests.models_on_disk import smollm2_transformers_dir
    from tests.runtime.lora_adapters import build_adapter

    cluster = Cluster.existing(os.environ["KUBECONFIG"])
    prepare_cache_node(cluster, node, Path(cache_root))
    s3 = S3StandIn(node_internal_ip(cluster, node))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        minilm, size = s3.upload(unique_bucket("demo-cache"), "minilm", minilm_dir())
        with tempfile.TemporaryDirectory(prefix="kubemaas-demo-lora-") as tmp:
            # a random rank-8 LoRA scaled down (scale 0.3) so that its answers still read as text
            lora = build_adapter(smollm2_transformers_dir(), Path(tmp) / ADAPTER_KEY, seed=7, r=8,
                                 targets=("q_proj", "v_proj", "o_proj"), scale=0.3)
            adapter, adapter_size = s3.upload(ADAPTER_BUCKET, ADAPTER_KEY, lora)
        create_secret(cluster, namespace, SECRET, s3.secret_env())
        print(f"S3 stand-in at {s3.endpoint}: {minilm} ({size} bytes), {adapter} ({adapter_size} bytes); "
              f"Secret {namespace}/{SECRET}", flush=True)
        Path(ready_file).write_text(json.dumps({"minilm": minilm, "adapter": adapter}))
        while not stop.wait(1):
            pass
    finally:
        s3.stop()


def reports(namespace: str, name: str) -> None:
    cluster = Cluster.existing(os.environ["KUBECONFIG"])
    for pod in sorted(runtime_pods(cluster, namespace, name), key=lambda p: p["metadata"]["creationTimestamp"]):
        pod_name = pod["metadata"]["name"]
        found = fetch_report(pod)
        print(f"{pod_name} on {pod['spec'].get('nodeName')}: "
              f"{'no report yet' if found is None else 'KubemaasCache: ' + json.dumps(found)}")
        log = cluster.kubectl("logs", "-n", namespace, pod_name, "-c", FETCH_CONTAINER, check=False).stdout
        for line in log.splitlines():
            if "cache filled" in line or "cache hit" in line:
                print(f"  {FETCH_CONTAINER} log: {line.strip()}")


def main() -> None:
    match sys.argv[1:]:
        case ["s3", namespace, node, cache_root, ready_file]:
            serve_s3(namespace, node, cache_root, ready_file)
        case ["reports", namespace, name]:
            reports(namespace, name)
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main()
