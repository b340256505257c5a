"""bench/gpu/run with --device cpu: the same code as on a GPU (exactness against generate,
builtin fp32 and bf16 under load through the openai client, the ratios), on a tiny random
Llama, so the GPU script is not dead code where CI has no GPU. The vllm check is left out here
(vLLM's start takes minutes on these cores; tests/runtime/test_generation_vllm.py covers that
engine); `bench/gpu/run --device cpu` runs it by hand."""

from __future__ import annotations

import os
import subprocess

from kubemaas_runtime.quantization import cpu_half_support

from tests.runtime.conftest import REPO
from tests.runtime.tiny_llm import build_tiny_llm


def test_the_gpu_script_runs_every_builtin_check_on_cpu(tmp_path):
    model = build_tiny_llm(tmp_path / "tiny", layers=3)
    ran = subprocess.run(
        [str(REPO / "bench" / "gpu" / "run"), "--device", "cpu", "--skip", "vllm",
         "--streams", "1,2", "--tokens", "4", "--exact-tokens", "8"],
        env={**os.environ, "KUBEMAAS_GPU_MODEL": str(model)}, capture_output=True, text=True,
        timeout=600, check=False)
    out = ran.stdout
    assert ran.returncode == 0, out + ran.stderr[-3000:]
    for check in ("env", "exactness", "builtin-fp32", "builtin-bf16"):
        assert f"== {check}\n" in out
    assert "4 checks passed, 0 failed" in out
    if cpu_half_support("bf16"):
        assert "builtin-bf16 / builtin-fp32 at 2 streams: tok/s " in out
    else:  # the runtime refuses emulated bf16 at start, and the script checks that it does
        assert "refused at start, as it must be on this CPU: QuantizationUnsupported: bf16" in out
        assert "builtin-bf16 / builtin-fp32" not in out


def test_the_gpu_script_fails_with_its_reason_where_cuda_is_missing(tmp_path):
    import torch

    ran = subprocess.run(
        [str(REPO / "bench" / "gpu" / "run"), "--device", "cuda", "--skip", "exactness,builtin,vllm"],
        env={**os.environ, "KUBEMAAS_GPU_MODEL": str(build_tiny_llm(tmp_path / "tiny"))},
        capture_output=True, text=True, timeout=300, check=False)
    if torch.cuda.is_available():
        assert ran.returncode == 0, ran.stdout
    else:
        assert ran.returncode == 1, ran.stdout
        assert "FAILED env: torch" in ran.stdout and "sees no GPU" in ran.stdout
