"""Dynamic batching, pure asyncio: no torch, no HTTP.

One loop task owns the model. When the model is idle a request runs at once; while a batch
runs, arrivals wait in a bounded queue and the next batch takes as many of them as fit in
`max_batch_size` rows (Triton's default: no added delay). `batch_timeout_s` > 0 lets a batch
wait up to that long after its oldest request for more rows.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from kubemaas_runtime.errors import InvalidInput, ModelNotReady, Overloaded

P = TypeVar("P")
R = TypeVar("R")


class BatchMismatch(RuntimeError):
    """The batch function returned a different number of results than it was given."""


class BatchObserver(Protocol):
    def observe_batch(self, rows: int, queue_waits: Sequence[float], run_seconds: float) -> None:
        ...

    def observe_queue_depth(self, depth: int) -> None:
        ...


@dataclasses.dataclass(slots=True)
class _Pending:
    payload: Any
    rows: int
    future: asyncio.Future
    enqueued_at: float


class DynamicBatcher(Generic[P, R]):
    def __init__(
        self,
        run_batch: Callable[[list[P]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_queue: int,
        batch_timeout_s: float = 0.0,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
        retry_alone: Callable[[Exception], bool] = lambda exc: True,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_timeout_s = batch_timeout_s
        self._observer = observer
        self._clock = clock
        self._retry_alone = retry_alone
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    # -- state -----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def is_full(self) -> bool:
        return len(self._queue) >= self.max_queue

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        """Refuse new requests, finish every queued one, then stop the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    # -- requests --------------------------------------------------------------------------
    async def submit(self, payload: P, rows: int = 1) -> R:
        """Queue one request of `rows` rows and wait for its result (or its batch's error)."""
        if self._closing:
            raise ModelNotReady("server is shutting down")
        if rows > self.max_batch_size:
            raise InvalidInput(
                f"request has {rows} rows but the max batch size is {self.max_batch_size}")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"request queue is full ({self.max_queue} waiting); retry later")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(payload, rows, future, self._clock()))
        self._wakeup.set()
        self._report_depth()
        return await future

    # -- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, rows = self._take([], 0)
            if self.batch_timeout_s > 0 and batch:
                batch, rows = await self._fill(batch, rows)
            self._report_depth()
            if batch:
                await self._execute(batch, rows)

    def _take(self, batch: list[_Pending], rows: int) -> tuple[list[_Pending], int]:
        queue = self._queue
        while queue:
            head = queue[0]
            if head.future.done():  # the client went away while waiting
                queue.popleft()
                continue
            if batch and rows + head.rows > self.max_batch_size:
                break
            queue.popleft()
            batch.append(head)
            rows += head.rows
        return batch, rows

    async def _fill(self, batch: list[_Pending], rows: int) -> tuple[list[_Pending], int]:
        deadline = batch[0].enqueued_at + self.batch_timeout_s
        while rows < self.max_batch_size and not self._closing:
            if self._queue:  # the head did not fit
                break
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
            batch, rows = self._take(batch, rows)
        return batch, rows

    async def _execute(self, batch: list[_Pending], rows: int) -> None:
        started = self._clock()
        waits = [started - p.enqueued_at for p in batch]
        try:
            try:
                results = await self._run(batch)
            except Exception as exc:
                if len(batch) == 1 or not self._retry_alone(exc):
                    raise
                # One member may have poisoned the batch: each runs alone, so only the culprit
                # gets the error.
                for pending in batch:
                    await self._execute_alone(pending)
                return
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
        except BaseException as exc:  # every waiter gets the batch's error
            error = exc if isinstance(exc, Exception) else ModelNotReady("batcher stopped")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            if error is not exc:
                raise
        finally:
            if self._observer is not None:
                self._observer.observe_batch(rows, waits, self._clock() - started)

    async def _run(self, batch: list[_Pending]) -> Sequence[R]:
        results = await self._run_batch([p.payload for p in batch])
        if len(results) != len(batch):
            raise BatchMismatch(f"batch of {len(batch)} requests produced {len(results)} results")
        return results

    async def _execute_alone(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        try:
            (result,) = await self._run([pending])
        except Exception as exc:  # noqa: BLE001 - the waiter gets whatever its run raised
            if not pending.future.done():
                pending.future.set_exception(exc)
        else:
            if not pending.future.done():
                pending.future.set_result(result)

    def fail_waiting(self, error: Exception) -> int:
        """Answer every request still waiting in the queue with `error` (shutdown: a clear 503
        rather than a connection reset when the grace period ends); how many there were."""
        failed = 0
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
                failed += 1
        self._report_depth()
        return failed

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.observe_queue_depth(len(self._queue))
