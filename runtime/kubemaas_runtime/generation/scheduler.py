"""Iteration-level scheduling: which sequences run in the next decode step.

Pure bookkeeping (no model, no threads; the engine holds the lock): a bounded FIFO of waiting
sequences, a running set bounded by `max_num_seqs`, and a KV-cache token budget. Each running
sequence reserves its prompt plus its `max_tokens` when admitted, so a running sequence never
runs out of cache and is never preempted; a sequence leaves at any token boundary (finished,
stopped, cancelled) and frees its reservation for the next in line.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from kubemaas_runtime.errors import InvalidInput, Overloaded


@dataclasses.dataclass(eq=False)
class ScheduledSequence:
    """What the scheduler knows of one sequence; `payload` is the engine's state for it."""

    prompt_tokens: int
    max_tokens: int
    payload: Any = None
    cancelled: bool = False

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


class Scheduler:
    def __init__(self, *, max_num_seqs: int, kv_cache_tokens: int, max_queue: int) -> None:
        if min(max_num_seqs, kv_cache_tokens, max_queue) < 1:
            raise ValueError("max_num_seqs, kv_cache_tokens and max_queue must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
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
        if sequence.reserved_tokens > self.kv_cache_tokens:
            raise InvalidInput(
                f"the request needs {sequence.reserved_tokens} KV-cache tokens "
                f"({sequence.prompt_tokens} prompt + {sequence.max_tokens} max_tokens), more "
                f"than this server's whole budget of {self.kv_cache_tokens}: lower max_tokens")
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"generation queue is full ({self.max_queue} waiting); retry later")
        self.waiting.append(sequence)

    def admit(self) -> list[ScheduledSequence]:
        """Move waiting sequences into the running set, first come first served, while a
        slot and the KV budget allow (the head of the queue is never overtaken, so a large
        request is not starved by small ones). Cancelled waiters are dropped here."""
        admitted = []
        while self.waiting:
            head = self.waiting[0]
            if head.cancelled:
                self.waiting.popleft()
                continue
            if (len(self.running) >= self.max_num_seqs
                    or self.reserved_tokens + head.reserved_tokens > self.kv_cache_tokens):
                break
            self.waiting.popleft()
            self.running.append(head)
            self.reserved_tokens += head.reserved_tokens
            admitted.append(head)
        return admitted

    def finish(self, sequence: ScheduledSequence) -> None:
        """The sequence leaves the running set (done, stopped or cancelled)."""
        self.running.remove(sequence)
        self.reserved_tokens -= sequence.reserved_tokens

    def drop_cancelled_waiting(self) -> list[ScheduledSequence]:
        dropped = [s for s in self.waiting if s.cancelled]
        if dropped:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        return dropped
