"""How fast the operator converges N ModelServices, and what it costs (run via bench/operator/run).

Reports, per N: time from the first create to all Ready; create-to-Deployment latency p50/p99
as the bench sees it (create call returned -> the Deployment's ADDED event on a watch); the
operator's own reconcile duration p50/p99 (its histogram); the operator's peak RSS and CPU
seconds; and its CPU over an idle window once everything has converged.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.e2e.msvc import modelservice
from tests.e2e.operator_process import OperatorProcess

KUBECTL = [str(Path(subprocess.check_output([str(REPO / "hack/cluster"), "bin"], text=True).strip()) / "kubectl")]
IDLE_SECONDS = 30


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run([*KUBECTL, *args], input=input, text=True, check=True, capture_output=True).stdout


def add_nodes(count: int) -> None:
    """Enough simulated CPU nodes for N one-pod ModelServices (110 pods per node is the default)."""
    docs = []
    for i in range(count):
        name = f"bench-cpu-{i}"
        cap = {"cpu": "64", "memory": "512Gi", "pods": "250"}
        docs.append({"apiVersion": "v1", "kind": "Node",
                     "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake",
                                                                "node.alpha.kubernetes.io/ttl": "0"},
                                  "labels": {"kubernetes.io/hostname": name, "type": "kwok"}},
                     "status": {"capacity": cap, "allocatable": cap, "phase": "Running"}})
    kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def histogram_quantile(metrics: str, name: str, q: float) -> float:
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) / 1024


def run_one(n: int, api: client.CustomObjectsApi, apps: client.AppsV1Api) -> dict:
    ns = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    created: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch_deployments() -> None:
        w = watch.Watch()
        for event in w.stream(apps.list_namespaced_deployment, ns, timeout_seconds=600):
            if event["type"] == "ADDED":
                owner = event["object"].metadata.labels.get("kubemaas.io/modelservice")
                seen.setdefault(owner, time.monotonic())
            if stop.is_set() or len(seen) >= n:
                w.stop()

    watcher = threading.Thread(target=watch_deployments, daemon=True)
    watcher.start()
    time.sleep(1)

    def create(i: int) -> None:
        name = f"m{i:04d}"
        api.create_namespaced_custom_object("kubemaas.io", "v1alpha1", ns, "modelservices",
                                            modelservice(name, cpu="100m", memory="128Mi"))
        created[name] = time.monotonic()

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(n)))
    while True:
        items = api.list_namespaced_custom_object("kubemaas.io", "v1alpha1", ns, "modelservices")["items"]
        ready = sum(1 for m in items for c in m.get("status", {}).get("conditions", [])
                    if c["type"] == "Ready" and c["status"] == "True")
        if ready == n:
            break
        if time.monotonic() - t0 > 600:
            raise SystemExit(f"N={n}: only {ready} Ready after 600 s")
        time.sleep(1)
    converge = time.monotonic() - t0
    stop.set()
    latencies = [seen[k] - created[k] for k in created if k in seen]
    return {"n": n, "converge_s": converge, "ns": ns,
            "lat_p50_ms": 1000 * statistics.median(latencies),
            "lat_p99_ms": 1000 * percentile(latencies, 0.99)}


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [100, 500]
    kcm_flags = os.environ.get("KUBEMAAS_KCM_FLAGS", "")
    print(f"controller-manager flags: {kcm_flags}")
    add_nodes(max(2, max(sizes) // 100 + 1))
    kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/modelservices.kubemaas.io")
    config.load_kube_config()
    api, apps = client.CustomObjectsApi(), client.AppsV1Api()
    op = OperatorProcess(os.environ["KUBECONFIG"], extra_env={"KUBEMAAS_OPERATOR_LOG_FORMAT": "json"}).start()
    try:
        rows = []
        for n in sizes:
            cpu0, _ = proc_stats(op.proc.pid)
            row = run_one(n, api, apps)
            cpu1, rss = proc_stats(op.proc.pid)
            time.sleep(5)  # let the last status writes land
            idle0, _ = proc_stats(op.proc.pid)
            time.sleep(IDLE_SECONDS)
            idle1, _ = proc_stats(op.proc.pid)
            metrics = op.metrics()
            row.update(cpu_s=cpu1 - cpu0, peak_rss_mib=rss, idle_cpu_pct=100 * (idle1 - idle0) / IDLE_SECONDS,
                       rec_p50_ms=1000 * histogram_quantile(metrics, "kubemaas_operator_reconcile_duration_seconds", 0.5),
                       rec_p99_ms=1000 * histogram_quantile(metrics, "kubemaas_operator_reconcile_duration_seconds", 0.99))
            rows.append(row)
            kubectl("delete", "namespace", row["ns"], "--wait=false")
    finally:
        op.stop()
    print(f"\nKubeMaaS operator benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")
    print("| N | all Ready (s) | create->Deployment p50 / p99 (ms) | reconcile p50 / p99 (ms, histogram bucket) "
          "| operator CPU (s) | peak RSS (MiB) | idle CPU over 30 s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['converge_s']:.1f} | {r['lat_p50_ms']:.0f} / {r['lat_p99_ms']:.0f} | "
              f"<= {r['rec_p50_ms']:.0f} / <= {r['rec_p99_ms']:.0f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['idle_cpu_pct']:.2f}% |")
    print("targets (2 cores): 500 converge < 60 s, peak RSS < 200 MiB, idle CPU near zero")


if __name__ == "__main__":
    main()
