"""`--compile decode`: the engine's pure-decode steps through `torch.compile` (inductor).

A step that only decodes (no prefill chunk, no LoRA adapter) runs ONE compiled graph over its
rows instead of the eager forward; any other step runs eager, as before.

- **Batch buckets.** The graphs are static in the batch: one per bucket, 1, 2, 4, 8, ... up to
  --max-num-seqs (which is itself the last bucket). A step of 5 rows runs the 8-row graph: the
  3 padding rows decode token 0 at position 0 into the pool's scratch block (kv_cache.py,
  `PagedKVCache.scratch`, never in a sequence's block table), so they never touch a real
  sequence's cache, and their logits are dropped.
- **Block-table width.** Dynamic (`mark_dynamic`): one graph covers every width from 2 blocks
  up, so a sequence that grows past a width runs the same graph (a 1-block table is padded to
  2 with the scratch block, masked out, because a dimension traced at 1 is specialised).
- **Compiled at start.** `compile_all()` traces and compiles every bucket before the engine
  starts, so before the server is ready: no request pays a compile. Serving runs under the
  `fail_on_recompile` stance: a call whose guards miss compiles nothing, it fails (and the
  step runs eager, as below).
- **Fallback.** A step with more rows than the largest bucket runs eager. A compile failure,
  or a compiled call that fails (a guard miss included), is logged once and turns compiled
  decode off: that step and every later one run eager (a failed call is rerun eager, which
  rewrites the same KV slots).
- **Freezing, and no weight prepack (issue 25).** Inductor's freezing is asked for through
  this compile's own `options`, so it does not change other compiles in the process. Those
  `options` reach only inductor, after dynamo has traced, and dynamo decides at trace time,
  from the global `torch._inductor.config.freezing`, whether a parameter is a graph constant
  or a graph input: so the weights stay graph inputs, nothing is folded or packed, and every
  linear runs as a plain `aten::mm`. `prepack_weights=True` traces with that flag patched on
  (for these calls only): each fp32 linear then becomes MKL's prepacked `mkl._mkl_linear` on
  x86 (`prepacked_linears` counts them). Measured on SmolLM2-135M fp32 that does not pay at
  8-32 rows and costs about 0.8 GB of packed weights per graph, so it is off (docs/runtime.md,
  "Where a compiled 32-row decode step spends its time"); bench/llm/decode_prepack.py
  compares the two. It raises dynamo's recompile limit (a process-wide setting) to the bucket
  count.

The outputs are not bitwise eager's (inductor orders float sums differently); greedy output
stays token-identical to eager except at near-ties, the engine's exactness contract
(docs/runtime.md "Compiled decode").
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch._dynamo.utils import counters

from kubemaas_runtime.generation.kv_cache import PagedCache, PagedKVCache, StepBatch

log = logging.getLogger("kubemaas_runtime")
MIN_WIDTH = 2  # blocks: a dimension traced at 1 is specialised, so tables are at least 2 wide


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_num_seqs, then max_num_seqs itself."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return (*buckets, max_num_seqs)


class CompiledDecode:
    """The compiled pure-decode forward of one engine's model and KV pool."""

    def __init__(self, model: torch.nn.Module, kv: PagedKVCache,
                 buckets: tuple[int, ...], *, prepack_weights: bool = False) -> None:
        """`prepack_weights`: freeze the weights into the graphs, each linear MKL-prepacked
        (see "Freezing" above: off in the engine, bench/llm/decode_prepack.py turns it on)."""
        self.model = model
        self.kv = kv
        self.buckets = tuple(sorted(buckets))
        self.enabled = True
        self.compiled_steps = 0  # steps that ran a compiled graph (tests and the benchmark)
        self.eager_steps = 0  # pure-decode steps that fell back to eager
        self.compile_seconds = 0.0
        self.prepack_weights = prepack_weights
        self.prepacked_linears = 0  # linears inductor's freezing packed, over every graph
        self._compiled: Any = torch.compile(self._forward, fullgraph=True, dynamic=False,
                                            options={"freezing": True})
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, len(self.buckets) + 1)

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 blocks: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[rows] ids, positions, slots, lengths and [rows, width] block tables -> [rows, vocab]
        logits: the decode rows of kv_cache.py's step, as one traced function."""
        size = self.kv.block_size
        keys = torch.arange(blocks.shape[1] * size, device=blocks.device)
        mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
        batch = StepBatch(slots, ids.shape[0], blocks, mask, [])
        out = self.model(input_ids=ids[None], position_ids=positions[None],
                         cache=PagedCache(self.kv, batch), use_cache=True)
        return out.logits[0]

    def _inputs(self, ids: list[int], decodes: list[tuple[list[int], int]], rows: int
                ) -> tuple[torch.Tensor, ...]:
        """The padded inputs: `rows` rows, the real ones first, then scratch rows."""
        kv, size, scratch = self.kv, self.kv.block_size, self.kv.scratch
        width = max(MIN_WIDTH, max((position // size + 1 for _, position in decodes), default=1))
        tables, slots, lengths = [], [], []
        for table, position in decodes:
            row = table[:width]
            tables.append(row + [scratch] * (width - len(row)))
            slots.append(table[position // size] * size + position % size)
            lengths.append(position + 1)
        padding = rows - len(decodes)
        tables += [[scratch] * width] * padding
        slots += [scratch * size] * padding
        lengths += [1] * padding
        device = kv.device
        return (torch.tensor(ids + [0] * padding, device=device),
                torch.tensor([p for _, p in decodes] + [0] * padding, device=device),
                torch.tensor(slots, device=device), torch.tensor(tables, device=device),
                torch.tensor(lengths, device=device))

    def compile_all(self) -> None:
        """Trace and compile every bucket (scratch rows only: no sequence's cache is read or
        written); call under inference_mode, as the engine thread runs. A failure turns
        compiled decode off (logged), the engine then runs eager."""
        started = time.perf_counter()
        self.kv.allocate(self.model)
        packed = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
        for rows in self.buckets:
            try:
                inputs = self._inputs([], [], rows)
                torch._dynamo.mark_dynamic(inputs[3], 1)
                # dynamo reads the global flag while tracing (see "Freezing" above)
                with (torch._inductor.config.patch(freezing=True) if self.prepack_weights
                      else contextlib.nullcontext()):
                    self._compiled(*inputs)
            except Exception:  # any compile failure means: serve eager
                log.exception("compiled decode: compiling the %d-row graph failed; decoding "
                              "eager", rows)
                self.enabled = False
                return
        self.compile_seconds = time.perf_counter() - started
        self.prepacked_linears = (
            counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - packed)
        log.info("compiled decode: %d graphs (batch buckets %s) in %.1f s, %d linears "
                 "prepacked", len(self.buckets), ",".join(map(str, self.buckets)),
                 self.compile_seconds, self.prepacked_linears)

    def decode(self, ids: list[int], decodes: list[tuple[list[int], int]]
               ) -> torch.Tensor | None:
        """[len(decodes), vocab] logits of a pure-decode step, or None: run it eager."""
        rows = self.bucket(len(decodes)) if self.enabled else None
        if rows is None:
            self.eager_steps += 1
            return None
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                logits = self._compiled(*self._inputs(ids, decodes, rows))
        except Exception:  # eager rewrites the same slots, so the step can rerun
            log.exception("compiled decode failed; decoding eager from now on")
            self.enabled = False
            self.eager_steps += 1
            return None
        self.compiled_steps += 1
        return logits[:len(decodes)]
