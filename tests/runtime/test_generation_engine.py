"""The generation scheduler, detokenizer, sampler and engine alone: a fake counting model, no
server."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from kubemaas_runtime.errors import InvalidInput, Overloaded
from kubemaas_runtime.generation.causal_lm import CausalLM
from kubemaas_runtime.generation.detokenize import REPLACEMENT, IncrementalText
from kubemaas_runtime.generation.engine import GenerationEngine
from kubemaas_runtime.generation.sampling import (
    SamplingParams,
    StepSampler,
    apply_penalties,
    filter_top_k_top_p,
    nucleus,
)
from kubemaas_runtime.generation.scheduler import ScheduledSequence, Scheduler
from kubemaas_runtime.metrics import create_metrics
from transformers import LlamaConfig

VOCAB = 32
EOS = 0


# -- scheduler -------------------------------------------------------------------------------
def seq(prompt: int, max_tokens: int) -> ScheduledSequence:
    return ScheduledSequence(prompt, max_tokens)


def test_scheduler_admits_fifo_within_slots_and_budget():
    s = Scheduler(max_num_seqs=2, kv_cache_tokens=100, max_queue=10)
    a, b, c, d = seq(10, 10), seq(30, 30), seq(5, 5), seq(1, 1)
    for x in (a, b, c, d):
        s.add(x)
    assert s.admit() == [a, b]  # two slots
    assert s.reserved_tokens == 80 and s.kv_cache_usage == pytest.approx(0.8)
    s.finish(a)
    assert s.admit() == [c]  # a slot, and 10 tokens fit
    s.finish(b)
    assert s.admit() == [d] and s.idle is False
    s.finish(c)
    s.finish(d)
    assert s.idle and s.reserved_tokens == 0


def test_scheduler_head_of_line_is_not_overtaken_by_smaller_requests():
    s = Scheduler(max_num_seqs=8, kv_cache_tokens=100, max_queue=10)
    big, small = seq(50, 40), seq(1, 1)
    s.add(seq(30, 30))
    s.add(big)
    s.add(small)
    assert len(s.admit()) == 1  # the big one waits for budget; the small one waits behind it
    assert list(s.waiting) == [big, small]


def test_scheduler_refuses_what_never_fits_and_a_full_queue():
    s = Scheduler(max_num_seqs=1, kv_cache_tokens=100, max_queue=2)
    with pytest.raises(InvalidInput, match="101 KV-cache tokens"):
        s.add(seq(1, 100))
    s.add(seq(1, 1))
    s.add(seq(1, 1))
    with pytest.raises(Overloaded):
        s.add(seq(1, 1))


def test_scheduler_drops_cancelled_waiters():
    s = Scheduler(max_num_seqs=1, kv_cache_tokens=100, max_queue=5)
    a, b, c = seq(1, 1), seq(1, 1), seq(1, 1)
    for x in (a, b, c):
        s.add(x)
    b.cancelled = True
    assert s.drop_cancelled_waiting() == [b]
    assert s.admit() == [a] and list(s.waiting) == [c]


# -- detokenizer and sampler -----------------------------------------------------------------
def letters(ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_incremental_text_holds_back_a_possible_stop_string():
    text = IncrementalText(letters, stop=("cd",))
    pieces = [text.add(i) for i in (0, 1, 2)]  # "a", "b", "c" (c may start "cd")
    assert "".join(pieces) == "ab" and not text.stopped
    assert text.add(3) == "" and text.stopped  # "cd" matched: text ends before it
    assert text.text == "ab"


def test_incremental_text_flushes_what_it_held():
    text = IncrementalText(letters, stop=("zz",))
    out = "".join(text.add(i) for i in range(5)) + text.flush()
    assert out == "abcde"


def test_incremental_text_waits_for_a_whole_character():
    raw = "é".encode()
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")
    text = IncrementalText(decode)
    assert text.add(raw[0]) == ""
    assert text.add(raw[1]) == "é"


def test_incremental_text_decodes_only_a_window_and_keeps_leading_spaces():
    # A sentencepiece-like decoder: even ids are words that start with a space, and the space
    # of the first word of any decoded list is dropped, as real tokenizers do at a start.
    calls: list[int] = []
    def decode(ids):
        calls.append(len(ids))
        return "".join((" w" if i % 2 == 0 else "x") + str(i) for i in ids).removeprefix(" ")
    text = IncrementalText(decode)
    ids = list(range(40))
    out = "".join(text.add(i) for i in ids) + text.flush()
    assert out == decode(ids)
    assert max(calls[:-1]) <= 2  # every step decoded a window of at most two tokens


def test_incremental_text_with_a_multibyte_character_split_mid_window():
    raw = "a€b😀c".encode()
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")
    text = IncrementalText(decode)
    out = "".join(text.add(b) for b in raw) + text.flush()
    assert out == "a€b😀c"
    cut = IncrementalText(decode)
    assert "".join(cut.add(b) for b in raw[:3]) == "a"  # "€" is incomplete: held back
    assert cut.flush() == REPLACEMENT  # at the end the decoder's rendering is handed out


def draw(sampler, logits, params_list, steps=1):
    """`steps` steps of `sampler` over the same logits: each row's tokens."""
    rows = [sampler.attach(p) for p in params_list]
    out = [[] for _ in rows]
    for _ in range(steps):
        tokens, _ = sampler.sample(logits, rows)
        for got, token in zip(out, tokens):
            got.append(token)
    return out


def test_step_sampler_greedy_rows_are_argmax_and_seeded_rows_repeat_in_any_company():
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.9], [1.0, 0.0, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    cpu = torch.device("cpu")
    seeded = SamplingParams(max_tokens=1, temperature=1.5, seed=7)
    other = SamplingParams(max_tokens=1, temperature=1.0)
    greedy_row = SamplingParams(max_tokens=1, temperature=0.0)
    alone = draw(StepSampler(cpu, 4), logits[:1], [seeded], steps=30)[0]
    mixed = draw(StepSampler(cpu, 4), logits[[1, 0, 2]], [greedy_row, seeded, other], steps=30)
    assert mixed[0] == [0] * 30  # greedy: argmax of its row
    assert mixed[1] == alone  # the seed's draws do not depend on the other rows
    assert len(set(alone)) > 1  # it does sample (temperature 1.5 over near-equal logits)
    assert draw(StepSampler(cpu, 4), logits[:1], [
        SamplingParams(max_tokens=1, temperature=1.5, seed=8)], steps=30)[0] != alone


def test_step_sampler_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(8000, 1)
    sampler = StepSampler(torch.device("cpu"), 1)
    rows = [sampler.attach(SamplingParams(max_tokens=1, temperature=1.0))] * 8000
    tokens, _ = sampler.sample(logits, rows)
    share = torch.bincount(torch.tensor(tokens), minlength=4).float() / 8000
    assert share.tolist() == pytest.approx(probs.tolist(), abs=0.025)


def test_top_k_and_top_p_filter_per_row():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3).log_softmax(-1)
    kept = filter_top_k_top_p(scores, torch.tensor([2, 0, 1]), torch.tensor([1.0, 0.8, 1.0]))
    finite = torch.isfinite(kept).tolist()
    assert finite[0] == [True, True, False, False]  # top_k 2
    probs = scores[1].exp()  # 0.64, 0.24, 0.09, 0.03: 0.64 + 0.24 reaches 0.8
    assert finite[1] == [True, True, False, False] and probs[0] < 0.8 < probs[:2].sum()
    assert finite[2] == [True, False, False, False]  # top_k 1
    sampler = StepSampler(torch.device("cpu"), 1)
    hot = SamplingParams(max_tokens=1, temperature=5.0, top_k=1)
    assert draw(sampler, scores[:1], [hot], steps=20)[0] == [0] * 20


def test_penalties_are_openais_and_count_only_generated_tokens():
    scores = torch.tensor([[3.0, 1.5, 0.8, 0.0]])
    count = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    assert apply_penalties(scores, count, torch.tensor([[0.5]]), torch.tensor([[0.25]])
                           ).tolist()[0] == pytest.approx([3.0 - 0.5 - 0.5, 1.5 - 0.5 - 0.25,
                                                           0.8, 0.0])
    cpu = torch.device("cpu")
    frequency = SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=1.0)
    presence = SamplingParams(max_tokens=1, temperature=0.0, presence_penalty=2.0)
    plain = SamplingParams(max_tokens=1, temperature=0.0)
    sampler = StepSampler(cpu, 3)
    got = draw(sampler, scores.repeat(3, 1), [frequency, presence, plain], steps=5)
    assert got[0] == [0, 0, 1, 0, 2]  # 3 | 2 vs 1.5 | 1 vs 1.5 | 1 vs .5, .8 | 0 vs .5, .8
    assert got[1] == [0, 1, 0, 0, 0]  # once a token has been seen it loses 2, once
    assert got[2] == [0] * 5
    # a released row starts again from no counts
    state = sampler.attach(frequency)
    assert sampler.sample(scores, [state])[0] == [0]


def test_logprobs_are_the_raw_log_softmax_of_the_chosen_and_the_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    sampler = StepSampler(torch.device("cpu"), 2)
    rows = [sampler.attach(SamplingParams(max_tokens=1, temperature=0.0, logprobs=2,
                                          frequency_penalty=2.0)),
            sampler.attach(SamplingParams(max_tokens=1, temperature=0.0))]
    tokens, logprobs = sampler.sample(logits, rows)
    want = logits[0].log_softmax(-1)
    assert tokens == [0, 2] and logprobs[1] is None
    chosen, top = logprobs[0]
    assert chosen == pytest.approx(float(want[0]))
    assert [t for t, _ in top] == [0, 1]
    assert [v for _, v in top] == pytest.approx(want[:2].tolist())
    # the second step: the penalty moves the choice, the logprobs stay the model's own
    tokens, logprobs = sampler.sample(logits, rows)
    assert tokens[0] == 1 and logprobs[0][0] == pytest.approx(float(want[1]))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = nucleus(probs, 0.7)
    assert kept.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    assert nucleus(probs, 0.1).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])


# -- engine with a fake model ----------------------------------------------------------------
class CountingLM(torch.nn.Module):
    """Next token = token + 1 (mod VOCAB) at each position kept; takes the engine's flattened
    step as a real model does (one [1, tokens] forward, per-token positions), writes one KV
    entry per token through the cache, with the position as its value, and checks through the
    pool that each sequence's cache holds exactly its own positions. Records how many
    sequences each forward samples (`batch_sizes`) and its token counts; `gate` lets a test
    hold the engine between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = LlamaConfig(num_hidden_layers=1, vocab_size=VOCAB, hidden_size=8,
                                  intermediate_size=8, num_attention_heads=1)
        self.batch_sizes: list[int] = []
        self.step_tokens: list[int] = []
        self.gate = threading.Semaphore(1000)
        self.entered = 0

    def forward(self, input_ids, position_ids, cache, use_cache, logits_to_keep):
        self.entered += 1
        self.gate.acquire()
        assert input_ids.shape[0] == 1
        self.batch_sizes.append(len(logits_to_keep))
        self.step_tokens.append(input_ids.shape[1])
        kv = position_ids.float()[:, None, :, None]  # [1, kv_heads 1, tokens, dim 1]
        keys, _ = cache.update(kv, kv, 0)
        batch = cache.batch
        if batch.decode_rows:  # each decode row sees exactly positions 0..its own
            gathered = keys.pool[batch.decode_blocks].reshape(batch.decode_rows, -1)
            for row in range(batch.decode_rows):
                length = int(batch.decode_mask[row].sum())
                assert length == int(position_ids[0, row]) + 1
                assert gathered[row, :length].tolist() == list(range(length))
        nxt = (input_ids[0, logits_to_keep] + 1) % VOCAB
        logits = torch.nn.functional.one_hot(nxt, VOCAB).float()[None] * 10
        return type("Out", (), {"logits": logits})()


def make_engine(max_num_seqs=4, kv_cache_tokens=1000, max_queue=16, max_model_len=64,
                block_size=1, max_num_batched_tokens=512):
    lm = CausalLM(CountingLM(), tokenizer=None, eos_token_ids=frozenset({EOS}),
                  context_length=max_model_len, source="fake")
    lm.decode = letters  # type: ignore[method-assign]
    metrics = create_metrics().bind("fake", "default")
    engine = GenerationEngine(
        lm, Scheduler(max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens,
                      max_queue=max_queue, block_size=block_size,
                      max_num_batched_tokens=max_num_batched_tokens),
        max_model_len=max_model_len, metrics=metrics)
    engine.start()
    return engine, lm.model, metrics


async def collect(stream):
    text, last = "", None
    async for chunk in stream.chunks():
        text += chunk.text
        last = chunk
    return text, last


def greedy(max_tokens, stop=(), ignore_eos=False):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop,
                          ignore_eos=ignore_eos)


def test_engine_runs_sequences_of_different_lengths_together():
    async def main():
        engine, model, metrics = make_engine()
        try:
            streams = [engine.submit([1], greedy(3)), engine.submit([5, 6], greedy(10)),
                       engine.submit([20], greedy(5))]
            results = await asyncio.gather(*(collect(s) for s in streams))
        finally:
            engine.stop()
        return results, model, metrics

    results, model, metrics = asyncio.run(main())
    assert results[0][0] == letters([2, 3, 4]) and results[0][1].finish_reason == "length"
    assert results[1][0] == letters(range(7, 17)) and results[1][1].completion_tokens == 10
    # 20 -> 21 ... 31 -> 0 is eos: stops, eos not in the text, but counted
    assert results[2][1].finish_reason == "length" and results[2][0] == letters(range(21, 26))
    assert max(model.batch_sizes) == 3  # decoded together
    assert metrics.metrics.registry.get_sample_value(
        "kubemaas_generation_tokens_total", {"model": "fake", "variant": "default"}) == 18
    assert metrics.metrics.registry.get_sample_value(
        "kubemaas_num_requests_running", {"model": "fake", "variant": "default"}) == 0


def test_engine_stops_at_eos_and_at_stop_strings():
    async def main():
        engine, _, _ = make_engine()
        try:
            eos = await collect(engine.submit([29], greedy(10)))  # 30, 31, then 0 = eos
            stop = await collect(engine.submit([1], greedy(10, stop=("de",))))
        finally:
            engine.stop()
        return eos, stop

    (eos_text, eos_last), (stop_text, stop_last) = asyncio.run(main())
    assert eos_last.finish_reason == "stop" and eos_text == letters([30, 31])
    assert eos_last.completion_tokens == 3
    assert stop_last.finish_reason == "stop" and stop_text == letters([2])  # "c", then "de"


def test_a_short_request_joins_and_leaves_while_a_long_one_runs():
    async def main():
        engine, _model, _ = make_engine(max_num_seqs=2)
        try:
            long = engine.submit([1], greedy(40, ignore_eos=True))
            chunks = long.chunks()
            await chunks.__anext__()  # the long one is running
            _short_text, short_last = await collect(engine.submit([3], greedy(2)))
            rest = [c async for c in chunks]
        finally:
            engine.stop()
        return short_last, rest

    short_last, rest = asyncio.run(main())
    assert short_last.finish_reason == "length"
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 40


def test_cancelled_stream_leaves_at_the_next_token_and_frees_its_slot():
    async def main():
        engine, _model, metrics = make_engine(max_num_seqs=1, kv_cache_tokens=10000,
                                             max_model_len=4000)
        try:
            stream = engine.submit([1], greedy(3000, ignore_eos=True))
            chunks = stream.chunks()
            await chunks.__anext__()
            await chunks.aclose()  # the client went away
            _text, last = await collect(engine.submit([2], greedy(2)))
        finally:
            engine.stop()
        return last, metrics

    last, metrics = asyncio.run(main())
    assert last.finish_reason == "length"
    generated = metrics.metrics.registry.get_sample_value(
        "kubemaas_generation_tokens_total", {"model": "fake", "variant": "default"})
    assert generated < 1000  # the cancelled one did not run to its end (nor to the unread cap)


def test_waiting_sequences_are_bounded_and_counted():
    async def main():
        engine, model, metrics = make_engine(max_num_seqs=1, max_queue=1)
        model.gate = threading.Semaphore(0)  # hold the engine inside its first forward
        try:
            first = engine.submit([1], greedy(2))
            while not model.entered:  # the first is admitted and inside its prefill
                await asyncio.sleep(0.01)
            second = engine.submit([1], greedy(2))
            waiting = metrics.metrics.registry.get_sample_value(
                "kubemaas_num_requests_waiting", {"model": "fake", "variant": "default"})
            overloaded = None
            try:
                engine.submit([1], greedy(2))
            except Overloaded as exc:
                overloaded = exc
            for _ in range(100):
                model.gate.release()
            results = [await collect(first), await collect(second)]
        finally:
            engine.stop()
        return waiting, overloaded, results

    waiting, overloaded, results = asyncio.run(main())
    assert overloaded is not None and waiting >= 1
    assert [r[1].finish_reason for r in results] == ["length", "length"]


# -- loading ---------------------------------------------------------------------------------
def test_gguf_path_is_a_file_or_a_directory_holding_exactly_one(tmp_path):
    from kubemaas_runtime.errors import ModelLoadFailed
    from kubemaas_runtime.generation.causal_lm import find_gguf_file

    with pytest.raises(ModelLoadFailed, match="exactly one .gguf file, found 0"):
        find_gguf_file(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert find_gguf_file(tmp_path) == tmp_path / "a.gguf"
    assert find_gguf_file(tmp_path / "a.gguf") == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadFailed, match="found 2"):
        find_gguf_file(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadFailed, match="not a .gguf file"):
        find_gguf_file(tmp_path / "model.bin")


def test_a_causal_lm_directory_without_safetensors_is_refused(tmp_path):
    from kubemaas_runtime.errors import ModelLoadFailed
    from kubemaas_runtime.generation.causal_lm import load_causal_lm

    with pytest.raises(ModelLoadFailed, match="no config.json"):
        load_causal_lm(tmp_path, "transformers", torch.device("cpu"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadFailed, match="never loaded"):
        load_causal_lm(tmp_path, "transformers", torch.device("cpu"))


# -- the KV budget in bytes ------------------------------------------------------------------
def test_kv_cache_memory_flag_takes_kubernetes_sizes_and_refuses_others(capsys):
    from kubemaas_runtime.config import parse_serve_config

    base = ["--model-uri", "file:///m/smollm2.gguf", "--format", "gguf"]
    cfg = parse_serve_config(base + ["--kv-cache-memory", "512Mi",
                                     "--max-num-batched-tokens", "64"], {})
    assert (cfg.kv_cache_memory, cfg.max_num_batched_tokens) == (512 << 20, 64)
    assert parse_serve_config(base, {"KUBEMAAS_KV_CACHE_MEMORY": "2G"}).kv_cache_memory == 2e9
    with pytest.raises(SystemExit):
        parse_serve_config(base + ["--kv-cache-memory", "lots"], {})
    assert "--kv-cache-memory" in capsys.readouterr().err


@pytest.mark.parametrize(("tokens", "memory", "expected"), [
    (None, 1 << 20, 16384),  # 1 MiB at 64 bytes a token
    (1000, 1 << 20, 992),  # both: the smaller, in whole blocks of 16
    (5000, None, 4992),
    (None, None, 4 * 64),  # the default: max-num-seqs x max-model-len
])
def test_the_pool_is_sized_in_bytes_and_whole_blocks(tokens, memory, expected):
    from pathlib import Path

    from kubemaas_runtime.generation.model import GenerativeModel
    from kubemaas_runtime.models.base import ModelOptions

    lm = CausalLM(CountingLM(), tokenizer=None, eos_token_ids=frozenset({EOS}),
                  context_length=64, source="fake")
    model = GenerativeModel(ModelOptions(path=Path("/none"), name="fake", max_num_seqs=4,
                                         kv_cache_tokens=tokens, kv_cache_memory=memory),
                            "transformers")
    model.max_model_len = 64
    # one layer, one KV head of 8 floats: 2 x 8 x 4 bytes a token
    assert model._kv_cache_tokens(lm) == expected and model.kv_bytes_per_token == 64


def test_an_admitted_sequence_takes_whole_blocks_and_gives_them_back():
    async def main():
        engine, _model, _ = make_engine(max_num_seqs=2, kv_cache_tokens=64, block_size=4,
                                        max_num_batched_tokens=3)
        _model.gate = threading.Semaphore(0)  # hold the engine inside its first forward
        try:
            stream = engine.submit([1, 2, 3, 4, 5, 6, 7], greedy(3))  # 10 tokens: 3 blocks
            while not _model.entered:
                await asyncio.sleep(0.01)
            free_while_running = engine.blocks.free_blocks
            for _ in range(100):
                _model.gate.release()
            chunks = stream.chunks()
            first = await chunks.__anext__()
            rest = [c async for c in chunks]
        finally:
            engine.stop()
        return first, free_while_running, rest, engine, _model

    first, free_while_running, rest, engine, model = asyncio.run(main())
    assert free_while_running == 16 - 3 and engine.blocks.free_blocks == 16
    assert first.text + "".join(c.text for c in rest) == letters([8, 9, 10])
    assert model.step_tokens[:3] == [3, 3, 1]  # a 7-token prompt read in chunks of 3


# -- the prefix cache ------------------------------------------------------------------------
def test_block_keys_chain_the_whole_prefix():
    from kubemaas_runtime.generation.kv_cache import block_keys

    a, b = block_keys([1, 2, 3, 4, 5], 2), block_keys([1, 2, 3, 4, 6, 7], 2)
    assert len(a) == 2 and a == b[:2]  # full blocks only; same prefix, same keys
    assert block_keys([9, 2, 3, 4], 2)[1] != a[1]  # same tokens after a different start


def test_allocator_shares_cached_blocks_and_evicts_the_least_recently_released():
    from kubemaas_runtime.generation.kv_cache import BlockAllocator

    pool = BlockAllocator(4, prefix_caching=True)
    first, second = pool.allocate(2), pool.allocate(2)
    pool.register(first[0], "a")
    pool.register(second[0], "b")
    assert pool.lookup(["a", "x"]) == [first[0]]  # held twice now
    pool.free(first)
    pool.free(second)
    assert pool.free_blocks == 3  # "a" still held once; "b" cached but idle
    pool.free([first[0]])
    assert pool.free_blocks == 4
    # two free blocks, then "b" (released before "a") is evicted, then "a"
    assert sorted(pool.allocate(2)) == sorted([first[1], second[1]])
    assert pool.allocate(1) == [second[0]] and pool.lookup(["b"]) == []
    assert pool.lookup(["a"]) == [first[0]]
    off = BlockAllocator(2)
    block = off.allocate(1)[0]
    off.register(block, "a")
    assert off.lookup(["a"]) == []  # prefix caching off: nothing is found


def test_shared_prefixes_in_a_tight_pool_never_run_out_mid_run():
    """40 sequences over 5 shared prefixes through a pool of 24 blocks of 4: each admitted
    sequence holds every block it will need, hits shared, so all finish with `length` (none
    with an error), each sees exactly its own positions (the fake model checks the pool), and
    the pool is whole again at the end; while running, what is held never exceeds the pool."""
    import random

    rng = random.Random(5)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(4 * (1 + i % 3))] for i in range(5)]
    prompts = [prefixes[i % 5] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 6))]
               for i in range(40)]

    async def main():
        engine, _model, metrics = make_engine(max_num_seqs=8, kv_cache_tokens=24 * 4,
                                             max_queue=64, block_size=4,
                                             max_num_batched_tokens=8)
        usage = []
        publish = engine._publish_gauges

        def watch():
            usage.append(engine.blocks.usage)
            publish()

        engine._publish_gauges = watch  # type: ignore[method-assign]

        async def one(i, prompt):
            await asyncio.sleep(0.002 * (i % 7))
            return await collect(engine.submit(prompt, greedy(rng.randrange(2, 9),
                                                              ignore_eos=True)))

        try:
            results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            engine.stop()
        return results, engine, metrics, usage

    results, engine, metrics, usage = asyncio.run(main())
    assert [last.finish_reason for _, last in results] == ["length"] * 40
    assert engine.blocks.free_blocks == 24 and max(usage) <= 1.0
    sample = metrics.metrics.registry.get_sample_value
    assert sample("kubemaas_prefix_cache_hits_total", {"model": "fake",
                                                       "variant": "default"}) > 0
