"""Every CUDA path of the runtime, in one run, for the day a GPU is lent (`bench/gpu/run`):

1. env: torch sees the device (its name, memory, torch and CUDA versions);
2. exactness: the builtin engine's greedy output, served (--engine builtin, fp32), solo and 8
   streams at once, against transformers' own `generate(do_sample=False)` on the same device
   and weights; a divergence passes only where generate's two best logits are within 1e-3
   (a near tie), as in tests/runtime/test_generation_exactness.py;
3. builtin fp32 and builtin bf16: tok/s, TTFT and ITL at 1, 8 and 32 streams (the official
   openai client, streaming, ignore_eos), and bf16's agreement with fp32's greedy text;
4. vllm: the runtime with --engine vllm, bf16 (fp32 with --device cpu, vLLM's CPU build),
   --tensor-parallel-size 1: greedy chat equal to vLLM's own offline `LLM.chat`, and the same
   load levels;
5. the ratios: builtin bf16 / fp32, vllm / builtin bf16.

Every check that fails prints why; the exit status is 1 if any did. `--device cpu` runs the same
code on the CPU (what CI and `tests/unit/test_bench_gpu.py` exercise). A benchmark and a
check, never a test: its numbers are printed, not asserted."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "llm"))

import bench_llm

from tests.ports import free_port

NEAR_TIE = 1e-3
PROMPTS = ["The capital of France is", "Kubernetes is", "Three prime numbers are",
           "Once upon a time", "The sea is", "A haiku about rain:", "GPUs are fast because",
           "My favourite colour is"]
CHATS = ["What is the capital of France?", "Name three prime numbers."]


class CheckFailed(Exception):
    pass


def log_file(name: str):
    return tempfile.NamedTemporaryFile("w", prefix=f"gpu-{name}-", suffix=".log", delete=False)


def start_runtime(python: str, model: Path, device: str, engine: str, quantization: str, log,
                  extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **bench_llm.VLLM_ENV, "PYTHONPATH": str(REPO / "runtime")}
    process = subprocess.Popen(
        [python, "-m", "kubemaas_runtime", "serve", "--model-uri", f"file://{model}",
         "--format", "transformers", "--task", "text-generation", "--engine", engine,
         "--device", device, "--quantization", quantization, "--name", "m",
         "--max-num-seqs", "32", "--max-model-len", "2048", "--host", "127.0.0.1",
         "--port", str(port), "--termination-log", os.devnull, "--log-level", "warning",
         *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        bench_llm.wait_http(f"{url}/v2/health/ready", process)
    except RuntimeError as exc:
        stop(process)
        raise CheckFailed(f"the runtime ({engine}, {quantization}, {device}) did not become "
                          f"ready: {exc}; log {log.name}") from None
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def completions(url: str, prompts: list[str], max_tokens: int, concurrent: bool) -> list[str]:
    import httpx

    def one(prompt: str) -> str:
        r = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True})
        if r.status_code != 200:
            raise CheckFailed(f"/v1/completions answered {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["text"]

    if not concurrent:
        return [one(p) for p in prompts]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def reference_generate(model: Path, device: str, prompts: list[str], max_tokens: int):
    """transformers' greedy generate, one prompt at a time, fp32, with its scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            gen = lm.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            tokens = gen.sequences[0, ids.shape[1]:].tolist()
            margins = []
            for score in gen.scores:
                top = torch.topk(score[0].float(), 2).values
                margins.append(float(top[0] - top[1]))
            out.append({"tokens": tokens, "margins": margins})
    return out, tokenizer


def divergence(text: str, expected: dict, tokenizer) -> str | None:
    """None when ``text`` is generate's text, or departs from it only at a near tie."""
    tokens = expected["tokens"]
    if text == tokenizer.decode(tokens, skip_special_tokens=True):
        return None
    k = 0
    while k < len(tokens) and text.startswith(tokenizer.decode(tokens[:k + 1],
                                                               skip_special_tokens=True)):
        k += 1
    if k < len(tokens) and expected["margins"][k] < NEAR_TIE:
        return None
    return f"departs at token {k} (generate's margin {expected['margins'][min(k, len(tokens) - 1)]:.2e})"


def check_exactness(args, model: Path) -> dict:
    n = args.exact_tokens
    expected, tokenizer = reference_generate(model, args.device, PROMPTS, n)
    with log_file("exact") as log:
        process, url = start_runtime(args.python, model, args.device, "builtin", "none", log)
        try:
            solo = completions(url, PROMPTS, n, concurrent=False)
            together = completions(url, PROMPTS, n, concurrent=True)
        finally:
            stop(process)
    problems = []
    for mode, texts in (("solo", solo), ("8 at once", together)):
        for prompt, text, want in zip(PROMPTS, texts, expected, strict=True):
            why = divergence(text, want, tokenizer)
            if why:
                problems.append(f"{mode} {prompt!r}: {why}: {text!r}")
    if problems:
        raise CheckFailed("greedy output is not generate's:\n  " + "\n  ".join(problems))
    return {"prompts": len(PROMPTS), "tokens": n}


def load_levels(url: str, args) -> dict:
    levels = {}
    for streams in args.streams:
        try:
            levels[streams] = asyncio.run(bench_llm.openai_load(url, "m", streams, args.tokens))
        except Exception as exc:  # noqa: BLE001 - the reason is the check's
            raise CheckFailed(f"{streams} streams: {type(exc).__name__}: {exc}") from None
        r = levels[streams]
        print(f"    {streams} streams: {r['tps']:.1f} tok/s, TTFT p50 {r['ttft50']:.0f} ms "
              f"p99 {r['ttft99']:.0f} ms, ITL p50 {r['itl50']:.1f} ms p99 {r['itl99']:.1f} ms",
              flush=True)
    return levels


def cpu_without_native(quantization: str) -> bool:
    """A CPU where the runtime refuses `quantization` at start (bf16 would be emulated)."""
    sys.path.insert(0, str(REPO / "runtime"))
    from kubemaas_runtime.quantization import CAST_DTYPES, cpu_half_support

    return quantization in CAST_DTYPES and cpu_half_support(quantization) is None


def check_refused_at_start(args, model: Path, quantization: str) -> dict:
    """On a CPU without native bf16 the runtime must refuse it at start, with its reason,
    rather than serve it emulated (quantization.py): that refusal is the check."""
    with log_file(f"builtin-{quantization}") as log:
        try:
            process, _ = start_runtime(args.python, model, args.device, "builtin", quantization, log)
        except CheckFailed:
            text = Path(log.name).read_text(errors="replace")
            if "QuantizationUnsupported" not in text:
                raise
            reason = next(line for line in text.splitlines() if line.startswith("QuantizationUnsupported"))
            print(f"    refused at start, as it must be on this CPU: {reason}", flush=True)
            return {"refused": reason}
        stop(process)
    raise CheckFailed(f"{quantization} served on a CPU without native {quantization}: it should be refused")


def check_builtin(args, model: Path, quantization: str, results: dict) -> dict:
    if args.device == "cpu" and cpu_without_native(quantization):
        return check_refused_at_start(args, model, quantization)
    with log_file(f"builtin-{quantization}") as log:
        process, url = start_runtime(args.python, model, args.device, "builtin", quantization, log)
        try:
            texts = completions(url, PROMPTS[:4], args.exact_tokens, concurrent=False)
            levels = load_levels(url, args)
        finally:
            stop(process)
    out = {"levels": levels, "texts": texts}
    if quantization == "bf16" and "builtin-fp32" in results:
        same = sum(a == b for a, b in zip(texts, results["builtin-fp32"]["texts"], strict=True))
        out["agree_with_fp32"] = f"{same}/{len(texts)}"
        print(f"    greedy text equal to fp32's for {same} of {len(texts)} prompts", flush=True)
    return out


def vllm_python(args) -> str:
    """The vLLM build's python: the CUDA one bench/gpu/run found or made, or on CPU the vLLM
    venv of hack/vllm-venv."""
    if args.vllm_python:
        if not os.access(args.vllm_python, os.X_OK):
            raise CheckFailed(f"the vLLM python {args.vllm_python} is not there")
        return args.vllm_python
    if args.device == "cuda":
        raise CheckFailed("no CUDA vLLM: put the vllm 0.33.0 wheel and its dependencies (its "
                          "CUDA torch) in KUBEMAAS_WHEELS (default shared/wheels) for "
                          "bench/gpu/run to install offline, or set KUBEMAAS_GPU_VLLM_PYTHON")
    found = subprocess.run([str(REPO / "hack" / "vllm-venv"), "--check"], capture_output=True,
                           text=True, check=False)
    if found.returncode != 0:
        raise CheckFailed("no vLLM venv for --device cpu: run hack/vllm-venv")
    return found.stdout.strip()


def check_vllm(args, model: Path) -> dict:
    python = vllm_python(args)
    dtype = "bf16" if args.device == "cuda" else "none"  # vLLM's CPU build: fp32 as stored
    work = Path(tempfile.mkdtemp(prefix="gpu-vllm-"))
    requests, answers = work / "requests.json", work / "answers.json"
    requests.write_text(json.dumps({"max_tokens": args.exact_tokens, "chats": [
        [{"role": "user", "content": q}] for q in CHATS]}))
    with log_file("vllm") as log:
        process, url = start_runtime(python, model, args.device, "vllm", dtype, log,
                                     ("--tensor-parallel-size", "1"))
        try:
            import openai

            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                   timeout=600)
            served = [client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": q}],
                max_tokens=args.exact_tokens, temperature=0).choices[0].message.content
                for q in CHATS]
            levels = load_levels(url, args)
        finally:
            stop(process)
    with log_file("vllm-offline") as offline_log:
        ran = subprocess.run([python, str(HERE / "vllm_offline.py"), str(model), str(requests),
                              str(answers), "bfloat16" if dtype == "bf16" else "float32"],
                             env={**os.environ, **bench_llm.VLLM_ENV}, stdout=offline_log,
                             stderr=subprocess.STDOUT, timeout=900, check=False)
    if ran.returncode != 0:
        raise CheckFailed(f"vLLM's offline reference failed ({ran.returncode}); log "
                          f"{offline_log.name}")
    expected = [a["text"] for a in json.loads(answers.read_text())]
    if served != expected:
        raise CheckFailed(f"greedy chat {served!r} is not vLLM's offline {expected!r}")
    return {"levels": levels}


def ratio_lines(results: dict, streams: tuple[int, ...]) -> list[str]:
    lines = []
    for mine, theirs in (("builtin-bf16", "builtin-fp32"), ("vllm", "builtin-bf16")):
        if "levels" not in results.get(mine, {}) or "levels" not in results.get(theirs, {}):
            continue
        for c in streams:
            a, b = results[mine]["levels"][c], results[theirs]["levels"][c]
            lines.append(f"{mine} / {theirs} at {c} streams: tok/s {a['tps'] / b['tps']:.2f}x, "
                         f"TTFT p50 {a['ttft50'] / b['ttft50']:.2f}x, ITL p50 "
                         f"{a['itl50'] / b['itl50']:.2f}x")
    return lines


def device_line(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise CheckFailed(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"cpu ({len(os.sched_getaffinity(0))} CPUs), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", type=Path, required=True, help="a transformers directory")
    parser.add_argument("--python", default=sys.executable, help="the runtime's python")
    parser.add_argument("--vllm-python", default=os.environ.get("KUBEMAAS_GPU_VLLM_PYTHON", ""))
    parser.add_argument("--skip", default="", help="comma-separated: exactness, builtin, vllm")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    parser.add_argument("--exact-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    args.streams = tuple(int(s) for s in args.streams.split(","))
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    results: dict = {}
    failures: list[str] = []

    def run(name: str, fn) -> None:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            results[name] = fn()
            print(f"   ok ({time.perf_counter() - t:.0f} s)", flush=True)
        except CheckFailed as exc:
            failures.append(f"{name}: {exc}")
            print(f"   FAILED: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its reason
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)

    run("env", lambda: print(f"   {device_line(args.device)}", flush=True))
    if "env" in results:
        if "exactness" not in skip:
            run("exactness", lambda: check_exactness(args, args.model))
        if "builtin" not in skip:
            run("builtin-fp32", lambda: check_builtin(args, args.model, "none", results))
            run("builtin-bf16", lambda: check_builtin(args, args.model, "bf16", results))
        if "vllm" not in skip:
            run("vllm", lambda: check_vllm(args, args.model))
    print("\n== ratios")
    for line in ratio_lines(results, args.streams):
        print(f"   {line}")
    print(f"\n{len(results)} checks passed, {len(failures)} failed, in "
          f"{time.perf_counter() - started:.0f} s")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
