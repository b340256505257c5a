"""How fast the operator converges N ModelServices, against the floor, in one run (bench/operator/run).

Per N, on the same cluster, one after the other, each in a fresh namespace deleted (and waited
for) before the next phase:

- the floor: no operator; 16 threads create each ModelService and, for it, server-side apply
  the children the operator's own builders make with the operator's own client, then patch its
  status once: the least work any operator must do. Converged when every Deployment is
  Available.
- the operator, started fresh (cluster-wide, as installed): the same creates; converged when
  every ModelService says Ready=True.

Both phases observe through one watch each (Deployments' Available, ModelServices' Ready), never
by listing every object again and again: a LIST of all N each second made the observer's own cost,
on the same two cores, grow as N squared.

Reports the ratio operator / floor; create-to-Deployment latency p50/p99 as a watch sees it
(create returned -> the Deployment's ADDED event); the operator's reconcile duration (its
histogram), CPU seconds, peak RSS (VmHWM) and CPU over an idle window once converged; and the
machine's load average (the machine is shared).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubemaas_operator.api import Condition, ModelService, ModelServiceStatus
from kubemaas_operator.api.constants import GROUP, PLURAL, VERSION
from kubemaas_operator.builders import build_children
from kubemaas_operator.kube import KubeClient, load_api_client
from kubemaas_operator.settings import OperatorSettings
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.e2e.msvc import condition, modelservice
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
    return cpu, status_mib(pid, "VmHWM")


def status_mib(pid: int, field: str) -> float:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


class RssSampler:
    """The operator's resident memory once a second: when the peak came, and what it keeps."""

    def __init__(self, pid: int) -> None:
        self.samples: list[tuple[float, float]] = []
        self._pid = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append((time.monotonic(), status_mib(self._pid, "VmRSS")))
            except (OSError, StopIteration):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak_at(self, t0: float) -> float:
        """Seconds after ``t0`` of the largest sample."""
        return max(self.samples, key=lambda s: s[1])[0] - t0 if self.samples else float("nan")


WORKERS = 16
TIMEOUT_S = 1200


CLUSTER_PROCESSES = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


def cluster_cpu() -> dict[str, float]:
    """CPU seconds so far of each control-plane process (their pids are in the cluster's state)."""
    pids = Path(os.environ["KUBEMAAS_CLUSTER_DIR"]) / "pids"
    out = {}
    for name in CLUSTER_PROCESSES:
        try:
            out[name] = proc_stats(int((pids / name).read_text()))[0]
        except (OSError, ValueError):
            out[name] = float("nan")
    return out


def api_requests() -> dict[tuple[str, str], float]:
    """The API server's request counters so far, by (verb, resource), and the watch events it
    sent, by resource (as ("WATCH-EVENTS", resource))."""
    counts: dict[tuple[str, str], float] = {}
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (labels.get("verb", ""), labels.get("resource", ""))
        elif line.startswith("apiserver_watch_events_total{"):
            key = ("WATCH-EVENTS", dict(re.findall(r'(\w+)="([^"]*)"', line)).get("resource", ""))
        else:
            continue
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


class ClusterCost:
    """What the control plane spent during one phase: CPU per process and API requests."""

    def __init__(self) -> None:
        self._cpu, self._requests = cluster_cpu(), api_requests()

    def stop(self) -> dict:
        cpu, requests = cluster_cpu(), api_requests()
        return {"cluster_cpu": {k: cpu[k] - self._cpu[k] for k in cpu},
                "requests": {k: v - self._requests.get(k, 0.0) for k, v in requests.items()
                             if v - self._requests.get(k, 0.0) >= 1}}


def describe_cost(label: str, n: int, cost: dict) -> str:
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in cost["cluster_cpu"].items())
    total = sum(cost["cluster_cpu"].values())
    writes = {k: v for k, v in cost["requests"].items() if k[0] in ("POST", "CREATE", "APPLY", "PATCH", "PUT", "UPDATE", "DELETE")}
    events = {k[1]: v for k, v in cost["requests"].items() if k[0] == "WATCH-EVENTS"}
    per = lambda d: ", ".join(f"{'/'.join(k) if isinstance(k, tuple) else k} {v / n:.2f}"
                              for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v / n >= 0.05)
    return (f"  {label}: control-plane CPU {total:.0f} s ({cpu})\n"
            f"  {label}: writes per ModelService: {per(writes)}\n"
            f"  {label}: watch events sent per ModelService: {per(events)}")


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


DEPLOYMENTS = ("apps", "v1", "deployments")


def _true(obj: dict, ctype: str) -> bool:
    return (c := condition(obj, ctype)) is not None and c["status"] == "True"


def _owner(obj: dict) -> str:
    return (obj["metadata"].get("labels") or {}).get("kubemaas.io/modelservice", "")


class Follow:
    """One watch on a kind in a namespace (as dicts): when each ModelService's object was first
    seen (ADDED), and how many satisfy ``done``. Both phases observe through watches, so what
    the observer costs grows with the events, not with N times the number of polls (a LIST of
    every object each second made the observer itself quadratic in N)."""

    def __init__(self, api: client.CustomObjectsApi, resource: tuple[str, str, str], ns: str,
                 key=_owner, done=None) -> None:
        self.seen: dict[str, float] = {}
        self._done: set[str] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(api, resource, ns, key, done), daemon=True)
        self._thread.start()
        time.sleep(1)

    def _run(self, api, resource, ns, key, done) -> None:
        group, version, plural = resource
        rv = None
        while not self._stop.is_set():
            w = watch.Watch()
            kwargs = {"resource_version": rv} if rv else {}
            for event in w.stream(api.list_namespaced_custom_object, group, version, ns, plural,
                                  timeout_seconds=TIMEOUT_S, **kwargs):
                if event["type"] == "ERROR":  # expired: list again (ADDED for every object)
                    rv = None
                    break
                obj = event["object"]
                rv = obj["metadata"].get("resourceVersion", rv)
                name = key(obj)
                if event["type"] == "ADDED":
                    self.seen.setdefault(name, time.monotonic())
                if done is not None:
                    with self._cond:
                        if event["type"] != "DELETED" and done(obj):
                            self._done.add(name)
                        else:
                            self._done.discard(name)
                        self._cond.notify_all()
                if self._stop.is_set():
                    w.stop()

    def wait(self, n: int, what: str, t0: float) -> float:
        """Seconds from ``t0`` until ``n`` objects are done."""
        with self._cond:
            while (count := len(self._done)) < n:
                if time.monotonic() - t0 > TIMEOUT_S:
                    raise SystemExit(f"N={n}: only {count}/{n} {what} after {TIMEOUT_S} s")
                self._cond.wait(1)
        return time.monotonic() - t0

    def stop(self) -> None:
        self._stop.set()


def create_all(n: int, ns: str, api: client.CustomObjectsApi, then=None) -> dict[str, float]:
    """Create N one-replica ModelServices from 16 threads; ``then(body)`` runs after each create."""
    created: dict[str, float] = {}

    def create(i: int) -> None:
        name = f"m{i:04d}"
        body = api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                   modelservice(name, cpu="100m", memory="128Mi"))
        created[name] = time.monotonic()
        if then is not None:
            then(body)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(create, range(n)))
    return created


def latencies(created: dict[str, float], seen: dict[str, float]) -> tuple[float, float]:
    values = [seen[k] - created[k] for k in created if k in seen]
    return 1000 * statistics.median(values), 1000 * percentile(values, 0.99)


def floor_status(ms: ModelService) -> dict:
    """The one status an operator must write at least: built through the API model."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = Condition(type="Ready", status="False", reason="WaitingForReplicas",
                      message="0/1 replicas ready.", last_transition_time=now,
                      observed_generation=ms.metadata.generation or 1)
    return ModelServiceStatus(observed_generation=ms.metadata.generation or 1, replicas=0,
                              ready_replicas=0, conditions=[ready]).to_wire()


def run_floor(n: int, api: client.CustomObjectsApi) -> dict:
    ns = new_namespace("floor", n)
    settings = OperatorSettings()
    kube = KubeClient(load_api_client(WORKERS), settings.field_manager)

    def children_and_status(body: dict) -> None:
        ms = ModelService.from_body(body)
        for child in build_children(ms, settings):
            kube.apply(child)
        kube.patch_status(ms.namespace, ms.name, floor_status(ms))

    watcher = Follow(api, DEPLOYMENTS, ns, done=lambda d: _true(d, "Available"))
    cost = ClusterCost()
    t0 = time.monotonic()
    created = create_all(n, ns, api, then=children_and_status)
    converge = watcher.wait(n, "Deployments Available", t0)
    spent = cost.stop()
    watcher.stop()
    p50, p99 = latencies(created, watcher.seen)
    delete_namespace(ns)
    return {"converge_s": converge, "lat_p50_ms": p50, "lat_p99_ms": p99, **spent}


def run_operator(n: int, api: client.CustomObjectsApi) -> dict:
    ns = new_namespace("operator", n)
    op = OperatorProcess(os.environ["KUBECONFIG"], extra_env={"KUBEMAAS_OPERATOR_LOG_FORMAT": "json"},
                         python_args=operator_python_args(n)).start()
    profiler = start_profiler(op.proc.pid, n)
    try:
        cpu0, _ = proc_stats(op.proc.pid)
        rss_start = status_mib(op.proc.pid, "VmRSS")
        sampler = RssSampler(op.proc.pid)
        watcher = Follow(api, DEPLOYMENTS, ns)
        readiness = Follow(api, (GROUP, VERSION, PLURAL), ns, key=lambda m: m["metadata"]["name"],
                           done=lambda m: _true(m, "Ready"))
        cost = ClusterCost()
        t0 = time.monotonic()
        created = create_all(n, ns, api)
        converge = readiness.wait(n, "ModelServices Ready", t0)
        spent = cost.stop()
        watcher.stop()
        readiness.stop()
        cpu1, rss = proc_stats(op.proc.pid)
        stop_profiler(profiler)
        time.sleep(5)  # let the last status writes land
        idle0, _ = proc_stats(op.proc.pid)
        time.sleep(IDLE_SECONDS)
        idle1, _ = proc_stats(op.proc.pid)
        rss_rest = status_mib(op.proc.pid, "VmRSS")
        sampler.stop()
        metrics = op.metrics()
    finally:
        op.stop()
    p50, p99 = latencies(created, watcher.seen)
    delete_namespace(ns)
    rec = "kubemaas_operator_reconcile_duration_seconds"
    return {"converge_s": converge, "lat_p50_ms": p50, "lat_p99_ms": p99, "cpu_s": cpu1 - cpu0, **spent,
            "peak_rss_mib": rss, "start_rss_mib": rss_start, "rest_rss_mib": rss_rest,
            "peak_at_s": sampler.peak_at(t0), "idle_cpu_pct": 100 * (idle1 - idle0) / IDLE_SECONDS,
            "rec_p50_ms": 1000 * histogram_quantile(metrics, rec, 0.5),
            "rec_p99_ms": 1000 * histogram_quantile(metrics, rec, 0.99)}


def start_profiler(pid: int, n: int) -> subprocess.Popen | None:
    """KUBEMAAS_BENCH_PROFILE=DIR: py-spy samples the operator until it converges, into
    DIR/operator-N.txt (collapsed stacks; `bench/operator/top_frames` summarises them)."""
    out = os.environ.get("KUBEMAAS_BENCH_PROFILE")
    if not out:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--rate", "40", "--format", "raw",
                             "--nonblocking", "--output", f"{out}/operator-{n}.txt"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def operator_python_args(n: int) -> list[str]:
    """What runs the operator module. KUBEMAAS_BENCH_MEMRAY=DIR: memray (`pip install memray`),
    which records every allocation into DIR/operator-N.bin; `python -m memray tree` or `stats` on it
    show what was resident at the peak, by where it was allocated. KUBEMAAS_BENCH_PYTHON_ARGS:
    the interpreter's arguments before ``-m kubemaas_operator`` (a probe that runs the module)."""
    if os.environ.get("KUBEMAAS_BENCH_PYTHON_ARGS"):  # any other wrapper: a probe script
        return shlex.split(os.environ["KUBEMAAS_BENCH_PYTHON_ARGS"])
    out = os.environ.get("KUBEMAAS_BENCH_MEMRAY")
    if not out:
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    target = Path(out) / f"operator-{n}.bin"
    target.unlink(missing_ok=True)
    return ["-m", "memray", "run", "--quiet", "-o", str(target)]


def stop_profiler(profiler: subprocess.Popen | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        profiler.wait(timeout=60)


def new_namespace(phase: str, n: int) -> str:
    ns = f"bench-{phase}-{n}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    return ns


def delete_namespace(ns: str) -> None:
    """Delete and wait, so the next phase does not share the machine with the garbage collector."""
    kubectl("delete", "namespace", ns, "--wait=true", f"--timeout={TIMEOUT_S}s")


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [100, 500]
    kcm_flags = os.environ.get("KUBEMAAS_KCM_FLAGS", "")
    print(f"controller-manager flags: {kcm_flags}")
    add_nodes(max(2, max(sizes) // 100 + 1))
    kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/modelservices.kubemaas.io")
    config.load_kube_config()
    api = client.CustomObjectsApi()
    rows = []
    for n in sizes:
        load_before = load()
        if os.environ.get("KUBEMAAS_BENCH_FLOOR", "1") == "0":  # profiling the operator alone
            floor = {"converge_s": float("nan"), "lat_p50_ms": float("nan"), "lat_p99_ms": float("nan")}
        else:
            floor = run_floor(n, api)
        print(f"N={n} floor: {floor['converge_s']:.1f} s (load {load_before})", flush=True)
        if "requests" in floor:
            print(describe_cost("floor", n, floor), flush=True)
        load_before = load()
        op = run_operator(n, api)
        print(f"N={n} operator: {op['converge_s']:.1f} s (load {load_before})", flush=True)
        print(describe_cost("operator", n, op), flush=True)
        rows.append((n, floor, op, load()))
    print(f"\nKubeMaaS operator benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores")
    print("| N | floor all Available (s) | operator all Ready (s) | ratio | create->Deployment p50 / p99 (ms), "
          "floor / operator | reconcile p50 / p99 (ms, bucket) | operator CPU (s) | peak RSS (MiB) "
          "| RSS start / at rest (MiB) | peak at (s) | idle CPU over 30 s | load avg after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, f, o, after in rows:
        print(f"| {n} | {f['converge_s']:.1f} | {o['converge_s']:.1f} | {o['converge_s'] / f['converge_s']:.2f}x | "
              f"{f['lat_p50_ms']:.0f} / {f['lat_p99_ms']:.0f} ; {o['lat_p50_ms']:.0f} / {o['lat_p99_ms']:.0f} | "
              f"<= {o['rec_p50_ms']:.0f} / <= {o['rec_p99_ms']:.0f} | {o['cpu_s']:.1f} | {o['peak_rss_mib']:.0f} | "
              f"{o['start_rss_mib']:.0f} / {o['rest_rss_mib']:.0f} | {o['peak_at_s']:.0f} | "
              f"{o['idle_cpu_pct']:.2f}% | {after} |")
    print("targets: ratio <= 1.3x at 500 and 2000, peak RSS < 200 MiB at 500, idle CPU near zero")


if __name__ == "__main__":
    main()
