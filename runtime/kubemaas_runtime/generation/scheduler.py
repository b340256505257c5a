"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Pure bookkeeping (no model, no threads; the engine holds the lock): a bounded FIFO of waiting
sequences, a running set bounded by `max_num_seqs`, and the KV cache. Each running sequence
holds the blocks of its prompt plus its `max_tokens` from admission on, so a running sequence
never runs out of cache and is never preempted; a sequence leaves at any token boundary
(finished, stopped, cancelled) and frees its reservation for the next in line. The engine
passes `admit` a `reserve` callback that takes the head's blocks from the pool, counting the
blocks the prefix cache already holds as shared (only the rest are taken fresh); without one
(tests, bookkeeping) the budget is `kv_cache_tokens`, each sequence charged its whole prompt +
`max_tokens` in whole blocks of `block_size`.

Each step (`schedule`) takes every decoding sequence first (one token each), then prefill chunks
of the prompts still being read, in admission order, while the step's token budget
(`max_num_batched_tokens`) lasts: a burst of long prompts never stalls the running streams for
more than one budget's worth of prefill per step.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

from kubemaas_runtime.errors import InvalidInput, Overloaded


@dataclasses.dataclass(eq=False)
class ScheduledSequence:
    """What the scheduler knows of one sequence; `payload` is the engine's state for it."""

    prompt_tokens: int
    max_tokens: int
    payload: Any = None
    cancelled: bool = False
    computed: int = 0  # tokens whose keys and values are in the cache
    block_size: int = 1  # set by the scheduler on add
    charged: int = 0  # tokens of the scheduler's own budget it holds (no `reserve` callback)

    @property
    def reserved_tokens(self) -> int:
        """The prompt plus max_tokens, rounded up to whole blocks."""
        blocks = -(-(self.prompt_tokens + self.max_tokens) // self.block_size)
        return blocks * self.block_size

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_tokens


class Scheduler:
    def __init__(self, *, max_num_seqs: int, kv_cache_tokens: int, max_queue: int,
                 block_size: int = 1, max_num_batched_tokens: int = 512) -> None:
        if min(max_num_seqs, kv_cache_tokens, max_queue, block_size,
               max_num_batched_tokens) < 1:
            raise ValueError("max_num_seqs, kv_cache_tokens, max_queue, block_size and "
                             "max_num_batched_tokens must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.kv_cache_tokens = kv_cache_tokens // block_size * block_size  # whole blocks
        if self.kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must hold at least one block")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.waiting: collections.deque[ScheduledSequence] = collections.deque()
        self.running: list[ScheduledSequence] = []
        self.reserved_tokens = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.reserved_tokens / self.kv_cache_tokens

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, sequence: ScheduledSequence) -> None:
        """Queue a sequence; InvalidInput when it could never fit, Overloaded when full."""
        sequence.block_size = self.block_size
        if sequence.reserved_tokens > self.kv_cache_tokens:
            raise InvalidInput(
                f"the request needs {sequence.reserved_tokens} KV-cache tokens "
                f"({sequence.prompt_tokens} prompt + {sequence.max_tokens} max_tokens"
                f"{'' if self.block_size == 1 else f', in blocks of {self.block_size}'}), more "
                f"than this server's whole budget of {self.kv_cache_tokens}: lower max_tokens")
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"generation queue is full ({self.max_queue} waiting); retry later")
        self.waiting.append(sequence)

    def admit(self, reserve: Callable[[ScheduledSequence], bool] | None = None
              ) -> list[ScheduledSequence]:
        """Move waiting sequences into the running set, first come first served, while a
        slot and the KV cache allow (the head of the queue is never overtaken, so a large
        request is not starved by small ones). `reserve(head)` takes the head's blocks and says
        whether it could (else the scheduler's own token budget decides). Cancelled waiters
        are dropped here."""
        admitted = []
        while self.waiting:
            head = self.waiting[0]
            if head.cancelled:
                self.waiting.popleft()
                continue
            if len(self.running) >= self.max_num_seqs:
                break
            if reserve is None:
                if self.reserved_tokens + head.reserved_tokens > self.kv_cache_tokens:
                    break
                head.charged = head.reserved_tokens
            elif not reserve(head):
                break
            self.waiting.popleft()
            self.running.append(head)
            self.reserved_tokens += head.charged
            admitted.append(head)
        return admitted

    def schedule(self) -> list[tuple[ScheduledSequence, int]]:
        """The next step: (sequence, tokens to run) for every decoding sequence (1 each), then
        prefill chunks in admission order within what is left of the token budget."""
        step = [(s, 1) for s in self.running if not s.prefilling]
        left = self.max_num_batched_tokens - len(step)
        for sequence in self.running:
            if left <= 0:
                break
            if sequence.prefilling:
                n = min(sequence.prompt_tokens - sequence.computed, left)
                step.append((sequence, n))
                left -= n
        return step

    def finish(self, sequence: ScheduledSequence) -> None:
        """The sequence leaves the running set (done, stopped or cancelled)."""
        self.running.remove(sequence)
        self.reserved_tokens -= sequence.charged
        sequence.charged = 0

    def drop_cancelled_waiting(self) -> list[ScheduledSequence]:
        dropped = [s for s in self.waiting if s.cancelled]
        if dropped:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        return dropped
