"""`--engine vllm --tensor-parallel-size 2` on CPU: vLLM's CPU backend splits the model over two
worker processes (gloo), one core each; a tiny random Llama (2 heads of 64, so each rank holds
one) built here, greedy output against transformers' `generate` on the same directory.

And what happens when vLLM's engine core dies under a running server: vLLM 0.32's CPU attention
has no kernel for head_dim 16, which it finds only at the first request (it reports ready
before). The server must not stay Ready and fail every request: it answers that request with a
500, turns unready, and exits with `EngineDead: ...` in the termination log.

Skipped without the vLLM venv, except under CI=true (see test_generation_vllm.py)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.runtime.conftest import RuntimeServer, runtime_env
from tests.runtime.test_generation_vllm import vllm_python  # noqa: F401 - the fixture
from tests.runtime.tiny_llm import build_tiny_llm

PROMPTS = ["the quick brown fox", "hello world", "kubernetes schedules", "one two three",
           "def add(a, b):", "the lazy dog", "how are you today?", "pods onto nodes"]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def vllm_server(vllm_python, directory, workdir, *extra: str) -> RuntimeServer:  # noqa: F811
    return RuntimeServer(
        ["--model-uri", f"file://{directory}", "--format", "transformers", "--task",
         "text-generation", "--engine", "vllm", "--name", "tiny", "--max-model-len", "200",
         "--max-num-seqs", "4", *extra],
        workdir, env=runtime_env(**VLLM_ENV),
        command=[str(vllm_python), "-m", "kubemaas_runtime", "serve"])


@pytest.fixture(scope="module")
def tiny64(module_tmp):
    return build_tiny_llm(module_tmp / "tiny64", hidden_size=128, heads=2, kv_heads=2)


@pytest.fixture(scope="module")
def split(module_tmp, vllm_python, tiny64):  # noqa: F811
    workdir = module_tmp / "tp2"
    workdir.mkdir()
    running = vllm_server(vllm_python, tiny64, workdir, "--tensor-parallel-size", "2")
    running.start(timeout=900)
    yield running
    running.stop(timeout=60)


def test_two_ranks_give_generates_greedy_tokens(split, tiny64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny64)
    compared = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), max_new_tokens=12, do_sample=False,
                                 min_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        compared += 1
        answer = httpx.post(f"{split.url}/v1/completions", timeout=300, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}).json()
        # a random model ends on incomplete UTF-8: decode() renders it as U+FFFD, vLLM's
        # incremental detokenizer holds it back, so the texts agree up to those
        assert answer["choices"][0]["text"].rstrip("\ufffd") == expected.rstrip("\ufffd"), prompt
        assert answer["usage"]["completion_tokens"] == 12
    assert compared == len(PROMPTS)
    parameters = httpx.get(f"{split.url}/v2/models/tiny", timeout=10).json()["parameters"]
    assert (parameters["engine"], parameters["tensor_parallel_size"]) == ("vllm", 2)
    assert split.metric("kubemaas_engine_info", 'tensor_parallel_size="2"') == 1


def test_a_dead_engine_core_ends_the_process_with_the_reason(module_tmp, vllm_python):  # noqa: F811
    directory = build_tiny_llm(module_tmp / "tiny16")  # head_dim 16
    workdir = module_tmp / "dead"
    workdir.mkdir()
    running = vllm_server(vllm_python, directory, workdir)
    try:
        running.start(timeout=900)
        failed = httpx.post(f"{running.url}/v1/completions", timeout=300, json={
            "model": "tiny", "prompt": "hello", "max_tokens": 4})
        assert failed.status_code == 500, failed.text
        assert running.process.wait(120) == 1
        line = running.termination_log.read_text()
        assert line.startswith("EngineDead: vLLM's engine core died"), line
    finally:
        running.stop(timeout=60)
