"""The generation engine: continuous batching on one dedicated thread.

Each iteration: drop cancelled sequences, admit waiting ones (Scheduler: slots and KV blocks),
plan the step (every decoding sequence's next token, then prefill chunks within the token
budget) and run it as ONE model forward over the flattened tokens, through the paged KV cache
(kv_cache.py: one KV write and one attention call per layer for the decode rows, one per
prefill chunk). The step's next tokens come from one batched sample over the rows that end there
(sampling.py: the parameters as tensors; one argmax when all rows are plain greedy) and one
`.tolist()`. Sequences join and leave the batch at token boundaries, and a short request
never waits for a long one to finish.

Greedy output equals `generate(do_sample=False)` alone except where generate's own two best
logits are within about 1e-3 of each other: the linear layers run over the whole step's tokens
(not one sequence's), and decode attention runs over padded, masked keys, so the float sums
are not bitwise those of a solo run (docs/runtime.md "Exactness").

The HTTP side talks to the thread through `submit()` (under the lock) and gets chunks on its
event loop through `GenerationStream`; the model never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from kubemaas_runtime.errors import ModelNotReady
from kubemaas_runtime.generation.causal_lm import CausalLM
from kubemaas_runtime.generation.compiled_decode import CompiledDecode, batch_buckets
from kubemaas_runtime.generation.detokenize import IncrementalText
from kubemaas_runtime.generation.kv_cache import (
    BlockAllocator,
    PagedCache,
    PagedKVCache,
    block_keys,
)
from kubemaas_runtime.generation.sampling import (
    SamplingParams,
    SequenceSampling,
    StepSampler,
    TokenLogprobs,
)
from kubemaas_runtime.generation.scheduler import ScheduledSequence, Scheduler

log = logging.getLogger("kubemaas_runtime")
# Chunks a client may leave unread before its stream counts as abandoned and is cancelled.
MAX_UNREAD_CHUNKS = 1024


@dataclasses.dataclass(frozen=True)
class Chunk:
    """New text of one sequence; the last chunk has a finish_reason: `stop` (eos or a stop
    string), `length` (max_tokens or the context), `abort` (server stopping) or `error`."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    # With params.logprobs set: one entry per token in token_ids, each
    # (logprob of the chosen token, ((token_id, logprob), ...) of the top k); else None.
    logprobs: tuple[TokenLogprobs, ...] | None = None


class GenerationStream:
    """The event-loop side of one sequence: iterate `chunks()`; `cancel()` when the client
    goes away (the engine drops the sequence at its next token boundary)."""

    def __init__(self, engine: GenerationEngine, sequence: ScheduledSequence,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._sequence = sequence
        self._loop = loop
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.unread = 0  # chunks sent by the engine and not yet taken (read by the engine)
        self.done = False

    def deliver(self, chunk: Chunk) -> None:
        """Engine thread: hand a chunk to the event loop."""
        self.unread += 1
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._sequence.cancelled = True

    async def chunks(self) -> AsyncIterator[Chunk]:
        try:
            while True:
                chunk = await self._queue.get()
                self.unread -= 1
                yield chunk
                if chunk.finish_reason is not None:
                    self.done = True
                    return
        finally:
            if not self.done:
                self.cancel()

    def cancel(self) -> None:
        if not self.done:
            self._engine.cancel(self._sequence)


@dataclasses.dataclass(eq=False)
class _Running:
    """Engine-thread state of one sequence."""

    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    stream: GenerationStream | None = None
    blocks: list[int] | None = None  # its block table, reserved at admission
    keys: list = dataclasses.field(default_factory=list)  # its prompt's full-block keys
    registered: int = 0  # of those, blocks prefilled and in the prefix cache
    sampling: SequenceSampling | None = None
    text: IncrementalText | None = None
    last_token: int = 0
    generated: int = 0
    last_token_at: float = 0.0
    adapter: str | None = None  # the LoRA adapter it runs with (adapters.py), None: the base


class GenerationEngine:
    def __init__(self, lm: CausalLM, scheduler: Scheduler, *, max_model_len: int,
                 metrics=None, prefix_caching: bool = True) -> None:
        self.lm = lm
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.metrics = metrics  # BoundMetrics or None
        self.device = next(lm.model.parameters()).device
        size = scheduler.block_size
        self.kv = PagedKVCache(scheduler.kv_cache_tokens // size, size, self.device)
        self.blocks = BlockAllocator(self.kv.num_blocks, prefix_caching=prefix_caching)
        self.sampler = StepSampler(self.device, scheduler.max_num_seqs)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # LoRA (adapters.py): the PeftAdapters of this model, and changes to its modules that
        # run on this thread between steps (a change returning False is tried again later)
        self.lora: Any = None
        self.lora_registry: Any = None  # AdapterRegistry: the per-adapter gauges
        self._between_steps: list[tuple[Callable[[], bool], concurrent.futures.Future]] = []
        self.compiled: CompiledDecode | None = None  # --compile decode (compile_decode())

    # -- the event-loop side -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def features(self) -> frozenset[str]:
        # of engine_api.FEATURES: sampling.py does top_k, the penalties and logprobs
        return frozenset({"top_k", "penalties", "logprobs"})

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               adapter: str | None = None) -> GenerationStream:
        """Queue a sequence (InvalidInput if it can never fit, Overloaded when the queue is
        full); call on the event loop."""
        if not self.alive:
            raise ModelNotReady("the generation engine is not running")
        state = _Running(list(prompt_ids), params, time.perf_counter(), adapter=adapter)
        sequence = ScheduledSequence(len(prompt_ids), params.max_tokens, state)
        stream = GenerationStream(self, sequence, asyncio.get_running_loop())
        state.stream = stream
        with self._wake:
            self.scheduler.add(sequence)
            self._publish_gauges()
            self._wake.notify()
        return stream

    def cancel(self, sequence: ScheduledSequence) -> None:
        with self._wake:
            sequence.cancelled = True
            self._wake.notify()

    def call_between_steps(self, change: Callable[[], bool]) -> concurrent.futures.Future:
        """Run `change` on the engine thread between two steps (at once when the engine is
        not running); a change that returns False is run again after the next step."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            while not change():
                pass
            done.set_result(None)
            return done
        with self._wake:
            self._between_steps.append((change, done))
            self._wake.notify()
        return done

    def adapter_in_use(self, name: str) -> bool:
        """Call on the engine thread: does a running or waiting sequence use this adapter?"""
        return any(s.payload.adapter == name
                   for s in (*self.scheduler.running, *self.scheduler.waiting))

    def _run_between_steps(self) -> None:
        with self._wake:
            pending, self._between_steps = self._between_steps, []
        for change, done in pending:
            try:
                finished = change()
            except Exception as exc:  # noqa: BLE001 - handed to the caller (a load that failed)
                done.set_exception(exc)
                continue
            if finished:
                done.set_result(None)
            else:
                with self._wake:
                    self._between_steps.append((change, done))

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self.scheduler.idle and not self._stopping and not self._between_steps:
                        self._wake.wait()
                    if self._stopping:
                        break
                if self._between_steps:
                    self._run_between_steps()
                with self._wake:
                    for sequence in self.scheduler.drop_cancelled_waiting():
                        self._finish(sequence, "abort", error="cancelled")
                    for sequence in [s for s in self.scheduler.running if s.cancelled]:
                        self._finish(sequence, "abort", error="cancelled")
                    for sequence in self.scheduler.admit(self._reserve):
                        self._admitted(sequence)
                    step = self.scheduler.schedule()
                    self._publish_gauges()
                try:
                    self._step(step)
                except Exception as exc:
                    log.exception("generation step failed")
                    with self._wake:
                        for sequence in list(self.scheduler.running):
                            self._finish(sequence, "error", error=f"{type(exc).__name__}: {exc}")
                with self._wake:
                    self._publish_gauges()
            with self._wake:
                for sequence in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(sequence, "abort", error="the server is stopping")
                self.scheduler.waiting.clear()
                self._publish_gauges()

    def _reserve(self, sequence: ScheduledSequence) -> bool:
        """Call with the lock held: take the sequence's whole block table (prompt +
        max_tokens) if the pool has it, the prefix cache's blocks shared. A hit held by a
        running sequence costs nothing; an idle cached hit leaves the free pool as a fresh
        block does. All of a sequence's blocks are taken here, so it never runs out mid-run."""
        state: _Running = sequence.payload
        size = self.kv.block_size
        if not state.keys:  # the prompt's full blocks, all but its last token (whose logits
            state.keys = block_keys(state.prompt_ids[:-1], size)  # give the first token)
            if state.adapter is not None:  # an adapter's KV differs from the base's for a prompt
                state.keys = [(state.adapter, key) for key in state.keys]
        total = sequence.reserved_tokens // size
        cached, idle = self.blocks.peek(state.keys)
        if total - cached + idle > self.blocks.free_blocks:
            return False
        hits = self.blocks.lookup(state.keys)
        state.blocks = hits + self.blocks.allocate(total - len(hits))
        state.registered = len(hits)
        sequence.computed = len(hits) * size
        self.kv.ensure_clean(max(state.blocks, default=0) + 1)
        if self.metrics is not None and self.blocks.prefix_caching:
            self.metrics.prefix_cache_queries.inc(len(state.keys) * size)
            self.metrics.prefix_cache_hits.inc(len(hits) * size)
        return True

    def _admitted(self, sequence: ScheduledSequence) -> None:
        """Call with the lock held: the sequence (its blocks taken) starts."""
        state: _Running = sequence.payload
        state.sampling = self.sampler.attach(state.params)
        state.text = IncrementalText(self.lm.decode, state.params.stop)

    def _step(self, step: list[tuple[ScheduledSequence, int]]) -> None:
        """One forward over the step's tokens: decode rows first, then prefill chunks."""
        if not step:
            return
        ids: list[int] = []
        positions: list[int] = []
        decodes: list[tuple[list[int], int]] = []
        prefills: list[tuple[list[int], int, int]] = []
        ending: list[tuple[ScheduledSequence, int]] = []  # sequences that sample, and at what
        rows: list[str | None] = []  # each token's adapter
        for sequence, n in step:
            state: _Running = sequence.payload
            start = sequence.computed
            rows += [state.adapter] * n
            if sequence.prefilling:
                ids += state.prompt_ids[start:start + n]
                prefills.append((state.blocks, start, n))
            else:
                ids.append(state.last_token)
                decodes.append((state.blocks, start))
            positions += range(start, start + n)
            if start + n >= sequence.prompt_tokens:  # its next token comes out of this step
                ending.append((sequence, len(ids) - 1))
        logits = None
        if self.compiled is not None and not prefills and self.lora is None:
            logits = self.compiled.decode(ids, decodes)  # None: eager (compiled_decode.py)
        if logits is None:
            logits = self._forward(ids, positions, decodes, prefills, ending, rows)
        for sequence, n in step:
            if sequence.prefilling and self.metrics is not None:
                self.metrics.prompt_tokens.inc(n)
            sequence.computed += n
            state = sequence.payload
            while (state.registered < len(state.keys)
                   and (state.registered + 1) * self.kv.block_size <= sequence.computed):
                self.blocks.register(state.blocks[state.registered], state.keys[state.registered])
                state.registered += 1
        # one batched sample over every row (one argmax when all are plain greedy), one transfer
        tokens, logprobs = self.sampler.sample(
            logits, [sequence.payload.sampling for sequence, _ in ending])
        for row, (sequence, _) in enumerate(ending):
            self._emit(sequence, tokens[row], logprobs[row] if logprobs is not None else None)

    def _forward(self, ids: list[int], positions: list[int],
                 decodes: list[tuple[list[int], int]], prefills: list[tuple[list[int], int, int]],
                 ending: list[tuple[ScheduledSequence, int]], rows: list[str | None]
                 ) -> torch.Tensor:
        """The eager forward of a step: the logits of the rows in `ending`."""
        batch = self.kv.step(decodes, prefills)
        keep = torch.tensor([index for _, index in ending], dtype=torch.long, device=self.device)
        with self.lora.step(rows) if self.lora is not None else contextlib.nullcontext():
            return self.lm.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                cache=PagedCache(self.kv, batch), use_cache=True, logits_to_keep=keep).logits[0]

    def compile_decode(self, buckets: tuple[int, ...] | None = None) -> CompiledDecode:
        """`--compile decode`: compile the pure-decode steps now (before `start()`), at the
        batch buckets up to max-num-seqs unless `buckets` is given."""
        compiled = CompiledDecode(self.lm.model, self.kv,
                                  buckets or batch_buckets(self.scheduler.max_num_seqs))
        with torch.inference_mode():
            compiled.compile_all()
        self.compiled = compiled
        return compiled

    def _emit(self, sequence: ScheduledSequence, token: int,
              logprobs: TokenLogprobs | None = None) -> None:
        """Hand out one generated token, and end the sequence when it is its last."""
        state: _Running = sequence.payload
        now = time.perf_counter()
        if self.metrics is not None:
            if state.generated == 0:
                self.metrics.ttft.observe(now - state.arrival)
            else:
                self.metrics.inter_token.observe(now - state.last_token_at)
            self.metrics.generation_tokens.inc()
        state.generated += 1
        state.last_token, state.last_token_at = token, now
        finish = None
        if token in self.lm.eos_token_ids and not state.params.ignore_eos:
            piece, finish = state.text.flush(), "stop"
        else:
            piece = state.text.add(token)
            if state.text.stopped:
                finish = "stop"
            elif (state.generated >= state.params.max_tokens
                  or sequence.computed + 1 > self.max_model_len):
                piece, finish = piece + state.text.flush(), "length"
        entries = (logprobs,) if logprobs is not None else None
        if finish is not None:
            with self._wake:
                self._finish(sequence, finish, piece=piece, token=token, logprobs=entries)
            return
        state.stream.deliver(Chunk(piece, (token,), None, len(state.prompt_ids),
                                   state.generated, logprobs=entries))
        if state.stream.unread > MAX_UNREAD_CHUNKS:  # nobody reads it: abandoned
            log.info("cancelling a stream with %d unread chunks", state.stream.unread)
            with self._wake:
                sequence.cancelled = True

    def _finish(self, sequence: ScheduledSequence, reason: str, *, piece: str = "",
                token: int | None = None, error: str | None = None,
                logprobs: tuple[TokenLogprobs, ...] | None = None) -> None:
        """Call with the lock held."""
        state: _Running = sequence.payload
        if logprobs is None and state.params.logprobs is not None:
            logprobs = ()  # a last chunk without a token
        state.stream.deliver(Chunk(piece, (token,) if token is not None else (), reason,
                                   len(state.prompt_ids), state.generated, error, logprobs))
        if sequence in self.scheduler.running:
            self._leave(sequence)

    def _leave(self, sequence: ScheduledSequence) -> None:
        self.scheduler.finish(sequence)
        state: _Running = sequence.payload
        if state.blocks is not None:
            self.blocks.free(state.blocks)
            state.blocks = None
        if state.sampling is not None:
            self.sampler.release(state.sampling)
            state.sampling = None

    def _publish_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self.scheduler.running))
            self.metrics.waiting.set(len(self.scheduler.waiting))
            self.metrics.kv_cache_usage.set(self.blocks.usage)
        if self.lora_registry is not None:
            self.lora_registry.publish(
                [s.payload.adapter for s in self.scheduler.running if s.payload.adapter],
                [s.payload.adapter for s in self.scheduler.waiting if s.payload.adapter])
