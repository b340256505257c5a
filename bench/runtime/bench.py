"""One run, one table: MiniLM sentence embeddings, one sentence per request, served by this
runtime, KServe's Python model server and LitServe at concurrency 1, 8 and 32 (wrk + Lua),
against the raw in-process batched forward of the same model; then every quantization variant
against fp32 with its drift. A benchmark, never a test: numbers are reported, not asserted."""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "runtime")]

from embedder import Embedder, minilm_dir
from loadgen import run_wrk, write_lua

CONCURRENCY = (1, 8, 32)
VARIANTS = ("none", "fp16", "bf16", "int8-dynamic", "int8-weight-only", "int4-weight-only")
_WORDS = ["the", "operator", "reconciles", "every", "model", "service", "while", "the", "runtime", "batches", "requests", "from", "many", "clients", "on", "a", "small", "shared", "CPU", "and", "reports", "latency", "percentiles", "to", "the", "autoscaler", "which", "adds", "replicas", "when", "the", "queue", "grows"]
# 64 sentences of 2 to 40 words, deterministic
SENTENCES = [" ".join(_WORDS[(7 * i) % 20:(7 * i) % 20 + 2 + (11 * i) % 39]).capitalize() + "."
             for i in range(64)]


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1e3, q))


def raw_forward(embedder: Embedder, batch: int, seconds: float) -> dict:
    """Back-to-back forwards in this process: the physical limit of the model on this CPU."""
    for _ in range(3):
        embedder.embed(SENTENCES[:batch])
    times, done, i = [], 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(batch)]
        i += batch
        started = time.perf_counter()
        embedder.embed(texts)
        times.append(time.perf_counter() - started)
        done += batch
    return {"rate": done / sum(times), "p50": percentile_ms(times, 50),
            "p99": percentile_ms(times, 99)}


class Server:
    def __init__(self, name: str, command: list[str], ready_path: str, infer_path: str,
                 body, workdir: Path, port: int) -> None:
        self.name, self.command, self.port = name, command, port
        self.ready_url = f"http://127.0.0.1:{port}{ready_path}"
        self.infer_url = f"http://127.0.0.1:{port}{infer_path}"
        self.script = write_lua(workdir / f"{name}.lua", [body(s) for s in SENTENCES])
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "runtime")]),
               "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(self.command, cwd=HERE, env=env,
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def v2_body(text: str) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def servers(workdir: Path, threads: int) -> list[tuple[str, Server | str]]:
    """(name, server or the reason it cannot run)."""
    model = minilm_dir()
    listed: list[tuple[str, Server | str]] = [("kubemaas-runtime", Server(
        "kubemaas-runtime",
        [sys.executable, "-m", "kubemaas_runtime", "serve", "--model-uri", f"file://{model}",
         "--format", "transformers", "--task", "feature-extraction", "--name", "minilm",
         "--host", "127.0.0.1", "--port", "18080", "--max-batch-size", "32",
         "--termination-log", str(workdir / "termination-log"), "--log-level", "warning"],
        "/v2/health/ready", "/v2/models/minilm/infer", v2_body, workdir, 18080))]
    for name, module, script, ready, path, body, port in (
            ("kserve", "kserve", "peer_kserve.py", "/v2/health/ready",
             "/v2/models/minilm/infer", v2_body, 18090),
            ("litserve", "litserve", "peer_litserve.py", "/health", "/predict",
             lambda t: {"text": t}, 18100)):
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - report exactly why a peer is missing
            listed.append((name, f"not measured: import {module} failed: {exc!r}"))
            continue
        listed.append((name, Server(name, [sys.executable, script, str(port), str(threads)],
                                    ready, path, body, workdir, port)))
    return listed


def measure_servers(workdir: Path, threads: int, seconds: float, embedder: Embedder
                    ) -> tuple[dict, dict]:
    """Each server's wrk results, and the raw batch-32 rate measured just before it (the
    machine is shared: the CPU left to us drifts over a run, so ratios use the adjacent raw)."""
    results: dict = {}
    adjacent: dict = {}
    for name, server in servers(workdir, threads):
        if isinstance(server, str):
            results[name] = server
            print(f"{name}: {server}", file=sys.stderr)
            continue
        adjacent[name] = raw_forward(embedder, 32, seconds)["rate"]
        try:
            server.start()
            check = httpx.post(server.infer_url, json=v2_body("hello") if "v2" in
                               server.infer_url else {"text": "hello"}, timeout=30)
            check.raise_for_status()
            run_wrk(server.infer_url, server.script, 8, 2)  # warm-up, discarded
            results[name] = {}
            for concurrency in CONCURRENCY:
                results[name][concurrency] = run_wrk(server.infer_url, server.script,
                                                     concurrency, seconds)
                print(f"{name} c={concurrency}: {results[name][concurrency]}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one failed server must not end the run
            results[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            print(f"{name}: {results[name]}", file=sys.stderr)
        finally:
            server.stop()
    return results, adjacent


def measure_variants(seconds: float) -> list[dict]:
    import torch
    from kubemaas_runtime.errors import ModelLoadFailed
    from kubemaas_runtime.models.base import ModelOptions, load_and_warm_up, run_predict
    from kubemaas_runtime.models.text_models import FeatureExtractionModel
    from kubemaas_runtime.protocol import Tensor

    batch = np.array(SENTENCES[:32], dtype=object)
    request = [{"text": Tensor("text", "BYTES", (32,), batch)}]
    rows, reference = [], None
    for method in VARIANTS:
        model = FeatureExtractionModel(ModelOptions(
            path=minilm_dir(), name="minilm", task="feature-extraction", quantization=method))
        try:
            load_and_warm_up(model)
        except ModelLoadFailed as exc:
            rows.append({"method": method, "refused": exc.termination_line()})
            continue
        outputs = run_predict(model, request)[0][0].data
        if reference is None:
            reference = outputs
        cosine = float((outputs * reference).sum(1).min())
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            run_predict(model, request)
            times.append(time.perf_counter() - started)
        buffer = io.BytesIO()
        torch.save(model._model.state_dict(), buffer)
        rows.append({"method": method, "rate": 32 * len(times) / sum(times),
                     "drift": model.drift or 0.0, "min_cos_bench": cosine,
                     "weights_mb": buffer.tell() / 2**20, "backend": model.quantization_backend})
        print(f"variant {rows[-1]}", file=sys.stderr)
    return rows


def fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(raw: dict, served: dict, adjacent: dict, variants: list[dict], info: str) -> str:
    lines = [info, "", fmt_row(["server", "concurrency", "sentences/s", "p50 ms", "p99 ms",
                                "errors", "raw b32 just before", "÷ raw b32", "÷ kserve",
                                "÷ litserve"]),
             fmt_row(["---"] * 10)]
    for batch in (1, 32):
        r = raw[batch]
        lines.append(fmt_row([f"raw forward, batch {batch}", "—", f"{r['rate']:.1f}",
                              f"{r['p50']:.2f}", f"{r['p99']:.2f}", 0, "",
                              f"{r['rate'] / raw[32]['rate']:.2f}", "", ""]))
    for name, result in served.items():
        if isinstance(result, str):
            lines.append(fmt_row([name, "—", result, "", "", "", "", "", "", ""]))
            continue
        limit = adjacent[name]
        for c, res in result.items():
            peers = []
            for peer in ("kserve", "litserve"):
                other = served.get(peer)
                peers.append(f"{res.rate / other[c].rate:.2f}"
                             if isinstance(other, dict) and peer != name else "")
            lines.append(fmt_row([name, c, f"{res.rate:.1f}", f"{res.p50_ms:.2f}",
                                  f"{res.p99_ms:.2f}", res.errors, f"{limit:.1f}",
                                  f"{res.rate / limit:.2f}", *peers]))
    lines += ["", fmt_row(["variant", "batch-32 sentences/s", "× fp32", "gate drift (16 probes)",
                           "min cos (32 bench sentences)", "weights MB", "applied"]),
              fmt_row(["---"] * 7)]
    base = next((v["rate"] for v in variants if v["method"] == "none" and "rate" in v), None)
    for v in variants:
        if "refused" in v:
            lines.append(fmt_row([v["method"], "—", "—", "—", "—", "—", v["refused"]]))
            continue
        lines.append(fmt_row([v["method"], f"{v['rate']:.1f}", f"{v['rate'] / base:.2f}",
                              f"{v['drift']:.4f}", f"{v['min_cos_bench']:.4f}",
                              f"{v['weights_mb']:.1f}", v["backend"]]))
    return "\n".join(lines)


def machine_info(threads: int) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()
    return (f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {cpu}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), {threads} torch "
            f"threads everywhere, wrk -t1; load average before the run "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8, help="per measured point")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--skip-servers", action="store_true")
    parser.add_argument("--skip-variants", action="store_true")
    args = parser.parse_args()
    from kubemaas_runtime.device import available_cpus

    threads = available_cpus()
    import torch

    torch.set_num_threads(threads)
    info = machine_info(threads)
    embedder = Embedder(threads=threads)
    raw = {batch: raw_forward(embedder, batch, args.seconds) for batch in (1, 32)}
    print(f"raw {raw}", file=sys.stderr)
    served, adjacent = {}, {}
    if not args.skip_servers:
        with tempfile.TemporaryDirectory(prefix="kubemaas-bench-") as tmp:
            served, adjacent = measure_servers(Path(tmp), threads, args.seconds, embedder)
    del embedder
    variants = [] if args.skip_variants else measure_variants(args.seconds / 2)
    load = os.getloadavg()
    info += f" Load average after: {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}."
    result = table(raw, served, adjacent, variants, info)
    print(result)
    if args.out:
        args.out.write_text(result + "\n")


if __name__ == "__main__":
    main()
