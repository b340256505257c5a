"""The engine's exactness contract on a real (tiny, random) Llama with grouped-query attention:
teacher-forced logits through the paged cache at every position against the plain forward,
whatever the chunking and whatever else shares the step; and free-running greedy output
against `generate(do_sample=False)` solo, 16-way, staggered and at prefill chunks of 1, 7 and
64 tokens. A divergence passes only where generate's own two best logits are within 1e-3."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from kubemaas_runtime.generation.causal_lm import load_causal_lm
from kubemaas_runtime.generation.engine import GenerationEngine
from kubemaas_runtime.generation.kv_cache import (
    BlockAllocator,
    PagedCache,
    PagedKVCache,
    use_paged_attention,
)
from kubemaas_runtime.generation.sampling import SamplingParams
from kubemaas_runtime.generation.scheduler import Scheduler

from tests.runtime.tiny_llm import build_tiny_llm

NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = build_tiny_llm(tmp_path_factory.mktemp("tiny") / "tiny-llm", layers=3)
    loaded = load_causal_lm(directory, "transformers", torch.device("cpu"))
    use_paged_attention(loaded.model)
    return loaded


def prompts(count: int, base: int = 5) -> list[list[int]]:
    """Prompts of different lengths (some past a block, some past 64 tokens)."""
    vocab = 300
    return [[(7 * i + 13 * j + 1) % vocab for j in range(base + (i * 11) % 90)]
            for i in range(count)]


def reference_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0]


# -- teacher-forced ----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_teacher_forced_logits_equal_the_plain_forward_at_every_position(lm, chunk):
    """Two sequences share every step: one is read in chunks of `chunk` tokens while the other
    decodes a token per step; each position's logits match a plain forward's."""
    size = 16
    kv = PagedKVCache(64, size, torch.device("cpu"))
    blocks = BlockAllocator(64)
    long, other = prompts(2, base=70)
    tables = [blocks.allocate(8), blocks.allocate(8)]
    kv.ensure_clean(16)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    done = [0, 0]
    other_prefilled = False
    with torch.inference_mode():
        while done[0] < len(long) or done[1] < len(other):
            decodes, prefills, ids, positions, owners = [], [], [], [], []
            if other_prefilled and done[1] < len(other):
                decodes.append((tables[1], done[1]))
                ids.append(other[done[1]])
                positions.append(done[1])
                owners.append((1, 1))
            if done[0] < len(long):
                n = min(chunk, len(long) - done[0])
                prefills.append((tables[0], done[0], n))
                ids += long[done[0]:done[0] + n]
                positions += range(done[0], done[0] + n)
                owners.append((0, n))
            if not other_prefilled:  # the other's first token prefills, then it decodes
                prefills.append((tables[1], 0, 1))
                ids.append(other[0])
                positions.append(0)
                owners.append((1, 1))
                other_prefilled = True
            batch = kv.step(decodes, prefills)
            logits = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor(
                [positions]), cache=PagedCache(kv, batch), use_cache=True).logits[0]
            start = 0
            for owner, n in owners:
                got[owner] += list(logits[start:start + n])
                done[owner] += n
                start += n
    for owner, ids in ((0, long), (1, other)):
        expected = reference_logits(lm, ids)
        torch.testing.assert_close(torch.stack(got[owner]), expected, atol=1e-4, rtol=1e-4)


# -- free-running ------------------------------------------------------------------------------
def generate_greedy(lm, prompt: list[int], count: int) -> list[int]:
    """generate(do_sample=False)'s loop, without its stop at eos (the engine runs with
    ignore_eos): one prefill, then one cached forward per token."""
    from transformers.cache_utils import DynamicCache

    cache, ids, out = DynamicCache(config=lm.model.config), torch.tensor([prompt]), []
    with torch.inference_mode():
        for _ in range(count):
            logits = lm.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
            out.append(int(logits.argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def check_against_generate(lm, prompt: list[int], tokens: list[int]) -> None:
    """`tokens` equal generate's greedy tokens, except after a near-tie of generate's own."""
    want = generate_greedy(lm, prompt, len(tokens))
    if tokens == want:
        return
    first = next(i for i, (a, b) in enumerate(zip(tokens, want)) if a != b)
    top2 = reference_logits(lm, prompt + want[:first])[-1].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, (f"diverged at token {first} where generate's top-2 gap is {gap:.3g}"
                            f": {tokens} != {want}")


def run_engine(lm, sequences: list[list[int]], max_tokens: int, *, max_num_seqs: int = 16,
               budget: int = 512, stagger: float = 0.0, params=None, chunks: bool = False
               ) -> list:
    """Each sequence's generated tokens (greedy unless `params`: one SamplingParams for all,
    or a list of one per sequence), or with `chunks` its Chunks."""
    async def main():
        engine = GenerationEngine(
            lm, Scheduler(max_num_seqs=max_num_seqs, kv_cache_tokens=64 * 16 * 16,
                          max_queue=64, block_size=16, max_num_batched_tokens=budget),
            max_model_len=256)
        engine.start()
        each = params if isinstance(params, list) else [params] * len(sequences)

        async def one(i, prompt):
            await asyncio.sleep(stagger * i)
            got = []
            asked = each[i] or SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                              ignore_eos=True)
            async for chunk in engine.submit(prompt, asked).chunks():
                got += [chunk] if chunks else chunk.token_ids
            return got

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(sequences)))
        finally:
            engine.stop()

    return asyncio.run(main())


def test_the_reference_loop_is_generate(lm):
    prompt = prompts(1)[0]
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert generate_greedy(lm, prompt, 8) == out[0, len(prompt):].tolist()[:8]


def test_solo_greedy_equals_generate(lm):
    for prompt in prompts(3):
        (tokens,) = run_engine(lm, [prompt], 24)
        check_against_generate(lm, prompt, tokens)


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_sixteen_together_at_each_prefill_chunk_size(lm, budget):
    batch = prompts(16)
    for prompt, tokens in zip(batch, run_engine(lm, batch, 12, budget=budget)):
        assert len(tokens) == 12
        check_against_generate(lm, prompt, tokens)


def test_thirty_two_staggered_arrivals_through_eight_slots(lm):
    batch = prompts(32, base=3)
    results = run_engine(lm, batch, 10, max_num_seqs=8, budget=40, stagger=0.01)
    for prompt, tokens in zip(batch, results):
        check_against_generate(lm, prompt, tokens)


# -- the prefix cache --------------------------------------------------------------------------
def test_prefix_cache_hits_skip_the_shared_prompt_and_keep_the_answers(lm):
    """A 40-token system prefix, then different questions: the later prompts take the prefix's
    two full blocks from the cache (the metric counts them), their answers still equal
    generate's, and a prompt with a different start misses."""
    from kubemaas_runtime.metrics import create_metrics

    system = [(5 * j + 3) % 300 for j in range(40)]
    questions = [system + [(11 * i + j) % 300 for j in range(5 + i)] for i in range(6)]
    other = [7] + system

    async def main():
        metrics = create_metrics().bind("tiny", "default")
        engine = GenerationEngine(
            lm, Scheduler(max_num_seqs=4, kv_cache_tokens=64 * 16, max_queue=64, block_size=16),
            max_model_len=256, metrics=metrics)
        engine.start()
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        async def one(prompt):
            ids = []
            async for chunk in engine.submit(prompt, params).chunks():
                ids += chunk.token_ids
            return ids

        try:
            first = await one(questions[0])  # fills the cache
            rest = await asyncio.gather(*(one(q) for q in questions[1:]))
            missed = await one(other)
        finally:
            engine.stop()
        return [first, *rest], missed, metrics

    answers, missed, metrics = asyncio.run(main())
    for prompt, tokens in zip(questions, answers):
        check_against_generate(lm, prompt, tokens)
    check_against_generate(lm, other, missed)
    sample = metrics.metrics.registry.get_sample_value
    labels = {"model": "tiny", "variant": "default"}
    assert sample("kubemaas_prefix_cache_hits_total", labels) == 5 * 32  # 2 blocks x 5 later
    assert sample("kubemaas_prefix_cache_queries_total", labels) > 5 * 32


# -- sampling features -------------------------------------------------------------------------
def test_logprobs_of_greedy_tokens_are_the_teacher_forced_log_softmax(lm):
    batch = prompts(4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    for prompt, chunks in zip(batch, run_engine(lm, batch, 8, params=params, chunks=True)):
        tokens = [t for c in chunks for t in c.token_ids]
        entries = [e for c in chunks for e in c.logprobs]
        assert len(entries) == len(tokens) == 8
        check_against_generate(lm, prompt, tokens)
        want = reference_logits(lm, prompt + tokens[:-1])[len(prompt) - 1:].log_softmax(-1)
        for position, (token, (chosen, top)) in enumerate(zip(tokens, entries)):
            assert chosen == pytest.approx(float(want[position, token]), abs=1e-4)
            values, ids = want[position].topk(3)
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
            assert top[0] == (token, pytest.approx(chosen))
            gaps = (values[:-1] - values[1:]).tolist()
            if min(gaps) > NEAR_TIE:
                assert [t for t, _ in top] == ids.tolist()


def test_top_k_one_samples_the_greedy_tokens(lm):
    batch = prompts(4)
    params = SamplingParams(max_tokens=10, temperature=1.3, top_k=1, ignore_eos=True)
    for prompt, tokens in zip(batch, run_engine(lm, batch, 10, params=params)):
        check_against_generate(lm, prompt, tokens)


def penalised_greedy(lm, prompt: list[int], count: int, presence: float, frequency: float
                     ) -> tuple[list[int], list[float]]:
    """The reference: a plain forward over prompt + what was generated, OpenAI's penalties
    (logit - presence * [count > 0] - frequency * count, over the generated tokens), argmax;
    and each step's top-2 gap."""
    out, gaps = [], []
    for _ in range(count):
        logits = reference_logits(lm, prompt + out)[-1]
        seen = torch.bincount(torch.tensor(out, dtype=torch.long),
                              minlength=logits.shape[-1]).float()
        scores = logits - presence * (seen > 0).float() - frequency * seen
        top2 = scores.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        out.append(int(scores.argmax()))
    return out, gaps


def test_penalties_change_repeated_tokens_as_openai_defines(lm):
    batch = prompts(4)
    settings = [(0.0, 1.5), (1.5, 0.0), (0.5, 0.5), (0.0, 0.0)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                             presence_penalty=p, frequency_penalty=f) for p, f in settings]
    changed = 0
    for prompt, (p, f), tokens in zip(batch, settings, run_engine(lm, batch, 12, params=params)):
        want, gaps = penalised_greedy(lm, prompt, 12, p, f)
        if tokens != want:
            first = next(i for i, (a, b) in enumerate(zip(tokens, want)) if a != b)
            assert gaps[first] < NEAR_TIE, (first, tokens, want)
        changed += want != generate_greedy(lm, prompt, 12)
    assert changed >= 2  # the penalised rows really repeat less than plain greedy


def test_a_seed_repeats_its_tokens_alone_and_in_company(lm):
    batch = prompts(6)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=11,
                            ignore_eos=True)
    (alone,) = run_engine(lm, batch[:1], 12, params=seeded)
    (again,) = run_engine(lm, batch[:1], 12, params=seeded)
    company = [seeded] + [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 5
    mixed = run_engine(lm, batch, 12, params=company)
    assert alone == again == mixed[0]
    other_seed = dataclasses.replace(seeded, seed=12)
    assert run_engine(lm, batch[:1], 12, params=other_seed)[0] != alone


def test_admission_counts_cached_prefix_blocks_once(lm):
    """A pool of 4 x 2 private blocks + the 4-block shared prefix (+ 1 spare): too small for 4
    sequences of 6 blocks each without sharing, enough with it. With the prefix cached, the 4
    are admitted together (4 decode rows in one step), each holding its whole block table from
    admission (so none runs out mid-run), and their answers are generate's; with caching off
    the same pool runs at most 2 at a time."""
    size = 16
    system = [(5 * j + 3) % 300 for j in range(4 * size)]
    # prompt 64 + 3..6 tokens and 20 generated: 87..90 tokens, 6 blocks, 4 of them the prefix
    questions = [system + [(11 * i + j) % 300 for j in range(3 + i)] for i in range(4)]

    def run(prefix_caching: bool):
        rows: list[int] = []

        async def main():
            engine = GenerationEngine(
                lm, Scheduler(max_num_seqs=8, kv_cache_tokens=(4 + 4 * 2 + 1) * size,
                              max_queue=64, block_size=size),
                max_model_len=256, prefix_caching=prefix_caching)
            step = engine.kv.step

            def counting(decodes, prefills):
                rows.append(len(decodes))
                return step(decodes, prefills)

            engine.kv.step = counting  # type: ignore[method-assign]
            engine.start()
            params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

            async def one(prompt):
                chunks = [c async for c in engine.submit(prompt, params).chunks()]
                return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason

            try:
                first = await one(questions[0])  # fills the cache with the prefix
                rows.clear()
                rest = await asyncio.gather(*(one(q) for q in questions))
            finally:
                engine.stop()
            return [first, *rest]

        return asyncio.run(main()), max(rows)

    answers, most = run(prefix_caching=True)
    assert most == 4
    for prompt, (tokens, reason) in zip([questions[0], *questions], answers):
        assert reason == "length"
        check_against_generate(lm, prompt, tokens)
    answers, most = run(prefix_caching=False)
    assert most == 2 and all(reason == "length" for _, reason in answers)
