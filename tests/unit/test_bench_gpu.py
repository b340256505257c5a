"""bench/gpu/gpu_check.py's judgements, and bench/llm's --vllm-compare table, on made-up
numbers: what counts as a divergence, what the vllm check says it needs, and the ratios."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(path: Path, name: str):
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load(REPO / "bench" / "gpu" / "gpu_check.py", "gpu_check")
bench_llm = load(REPO / "bench" / "llm" / "bench_llm.py", "bench_llm")


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i)."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(97 + t) for t in tokens)


def test_the_same_text_is_no_divergence():
    assert gpu_check.divergence("abc", {"tokens": [0, 1, 2], "margins": [1, 1, 1]}, Letters()) is None


def test_a_departure_where_generate_was_sure_is_reported_with_its_position():
    why = gpu_check.divergence("abd", {"tokens": [0, 1, 2], "margins": [1.0, 1.0, 0.5]}, Letters())
    assert why is not None and "token 2" in why


def test_a_departure_at_a_near_tie_passes():
    assert gpu_check.divergence("abd", {"tokens": [0, 1, 2], "margins": [1.0, 1.0, 1e-4]},
                                Letters()) is None


def test_without_a_cuda_vllm_the_check_says_what_it_needs():
    with pytest.raises(gpu_check.CheckFailed, match="KUBEMAAS_WHEELS"):
        gpu_check.vllm_python(Namespace(vllm_python="", device="cuda"))
    with pytest.raises(gpu_check.CheckFailed, match="not there"):
        gpu_check.vllm_python(Namespace(vllm_python="/nonexistent/python", device="cuda"))


def level(tps: float, ttft: float, itl: float) -> dict:
    return {"tps": tps, "ttft50": ttft, "ttft99": ttft * 2, "itl50": itl, "itl99": itl * 2}


def test_gpu_ratios_divide_the_named_pairs():
    results = {"builtin-fp32": {"levels": {8: level(100, 50, 10)}},
               "builtin-bf16": {"levels": {8: level(150, 40, 8)}},
               "vllm": {"levels": {8: level(600, 20, 4)}}}
    lines = gpu_check.ratio_lines(results, (8,))
    assert lines == ["builtin-bf16 / builtin-fp32 at 8 streams: tok/s 1.50x, TTFT p50 0.80x, ITL p50 0.80x",
                     "vllm / builtin-bf16 at 8 streams: tok/s 4.00x, TTFT p50 0.50x, ITL p50 0.50x"]


def test_the_vllm_compare_table_gives_each_engine_over_vllms_own_server():
    results = {("vllm-engine", 32, 64): level(95, 110, 10), ("vllm-server", 32, 64): level(100, 100, 10),
               ("builtin", 32, 64): level(40, 200, 30), ("builtin-compiled", 32, 64): level(60, 150, 20)}
    lines = bench_llm.compare_table(results, (32,), (64,))
    assert "| kubemaas --engine vllm | 32 | 64 | 0.95x | 1.10x | 1.10x | 1.00x | 1.00x |" in lines
    assert "| kubemaas --engine builtin | 32 | 64 | 0.40x | 2.00x | 2.00x | 3.00x | 3.00x |" in lines
    assert ("| kubemaas --engine builtin --compile decode | 32 | 64 | 0.60x | 1.50x | 1.50x | 2.00x | 2.00x |"
            in lines)
    assert "| kubemaas --engine vllm | 32 | 64 | 95.0 | 110 | 220 | 10.0 | 20.0 |" in lines
    results.pop(("vllm-server", 32, 64))
    lines = bench_llm.compare_table(results, (32,), (64,))
    assert "| vllm serve (vLLM's own OpenAI server) | 32 | 64 | failed | | | | |" in lines
    assert "| kubemaas --engine vllm | 32 | 64 | n/a | | | | |" in lines
