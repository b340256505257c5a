"""The paged attention's K/V gather, in-process: one layer's decode gather (32 rows of 32
blocks of 16 tokens, 3 KV heads of 64: SmolLM2-135M's shape at 512 tokens each) into a fresh
tensor (the engine before) and into the reused buffers `PagedKVCache.gather` keeps, beside the
physical reference measured in the same run: a plain copy of the same bytes into a buffer that
already exists (the floor a gather can reach). A benchmark, never a test.

    .venv/bin/python bench/llm/kv_gather.py [--rows 32] [--blocks 32] [--iterations 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "runtime")]

from kubemaas_runtime.generation.kv_cache import PagedKVCache


def per_call(fn, iterations: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = torch.randn(4096, 16, 3, 64)
    blocks = torch.randint(0, 4096, (args.rows, args.blocks))
    source = pool[:args.rows * args.blocks].clone()
    target = torch.empty_like(source)
    fresh = PagedKVCache(4096, 16, torch.device("cpu"))
    fresh.reuse_buffers = False
    reused = PagedKVCache(4096, 16, torch.device("cpu"))
    copy_us = per_call(lambda: target.copy_(source), args.iterations)
    fresh_us = per_call(lambda: fresh.gather(pool, blocks, 0), args.iterations)
    reused_us = per_call(lambda: reused.gather(pool, blocks, 0), args.iterations)
    megabytes = source.numel() * source.element_size() / 2**20
    print(f"K/V gather of {megabytes:.1f} MiB ({args.rows} rows x {args.blocks} blocks), "
          f"{args.threads} thread(s)")
    print("| path | us/gather | x copy floor |\n| --- | --- | --- |")
    for name, value in [("copy into an existing buffer (floor)", copy_us),
                        ("gather into a fresh tensor (before)", fresh_us),
                        ("gather into the reused buffer (now)", reused_us)]:
        print(f"| {name} | {value:.0f} | {value / copy_us:.2f}x |")
    print(f"reused / fresh: {reused_us / fresh_us:.2f}x the time")


if __name__ == "__main__":
    main()
