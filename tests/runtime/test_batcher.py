"""The batcher alone: no model, no server."""

from __future__ import annotations

import asyncio

import pytest
from kubemaas_runtime.batcher import BatchMismatch, DynamicBatcher
from kubemaas_runtime.errors import InvalidInput, ModelNotReady, Overloaded


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.waits: list[float] = []
        self.depths: list[int] = []

    def observe_batch(self, rows, queue_waits, run_seconds):
        self.batches.append(rows)
        self.waits.extend(queue_waits)

    def observe_queue_depth(self, depth):
        self.depths.append(depth)


class GatedModel:
    """A batch function whose forward only returns when the test opens the gate."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, payloads):
        self.calls.append(list(payloads))
        self.started.set()
        await self.gate.wait()
        return [p * 10 for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_idle_request_runs_at_once_alone():
    async def scenario():
        model = GatedModel()
        observer = RecordingObserver()
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=8, observer=observer)
        batcher.start()
        assert await batcher.submit(3) == 30
        await batcher.close()
        return model.calls, observer

    calls, observer = run(scenario())
    assert calls == [[3]]
    assert observer.batches == [1]
    assert len(observer.waits) == 1


def test_arrivals_while_busy_form_the_next_batch():
    async def scenario():
        model = GatedModel()
        model.gate.clear()
        observer = RecordingObserver()
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue=16, observer=observer)
        batcher.start()
        first = asyncio.create_task(batcher.submit(0))
        await model.started.wait()  # the model is now busy with [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return model.calls, results, observer

    calls, results, observer = run(scenario())
    assert results == [i * 10 for i in range(7)]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]
    assert observer.batches == [1, 4, 2]


def test_rows_count_toward_the_batch_size():
    async def scenario():
        model = GatedModel()
        model.gate.clear()
        batcher = DynamicBatcher(model, max_batch_size=5, max_queue=16)
        batcher.start()
        first = asyncio.create_task(batcher.submit(0, rows=1))
        await model.started.wait()
        tasks = [asyncio.create_task(batcher.submit(i, rows=2)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.close()
        return model.calls

    assert run(scenario()) == [[0], [1, 2], [3]]


def test_request_larger_than_batch_is_invalid():
    async def scenario():
        batcher = DynamicBatcher(GatedModel(), max_batch_size=2, max_queue=2)
        batcher.start()
        with pytest.raises(InvalidInput, match="max batch size is 2"):
            await batcher.submit(1, rows=3)
        await batcher.close()

    run(scenario())


def test_full_queue_is_overloaded():
    async def scenario():
        model = GatedModel()
        model.gate.clear()
        batcher = DynamicBatcher(model, max_batch_size=1, max_queue=2)
        batcher.start()
        running = asyncio.create_task(batcher.submit(0))
        await model.started.wait()
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        assert batcher.is_full and batcher.queue_depth == 2
        with pytest.raises(Overloaded):
            await batcher.submit(3)
        model.gate.set()
        assert await asyncio.gather(running, *queued) == [0, 10, 20]
        await batcher.close()

    run(scenario())


def test_batch_error_reaches_every_waiter():
    async def failing(payloads):
        raise ValueError("forward exploded")

    async def scenario():
        batcher = DynamicBatcher(failing, max_batch_size=4, max_queue=4)
        batcher.start()
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                       return_exceptions=True)
        await batcher.close()
        return results

    results = run(scenario())
    assert all(isinstance(r, ValueError) for r in results)


def test_result_count_mismatch_is_an_error_for_all():
    async def short(payloads):
        return payloads[:-1]

    async def scenario():
        batcher = DynamicBatcher(short, max_batch_size=4, max_queue=4)
        batcher.start()
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                       return_exceptions=True)
        await batcher.close()
        return results

    results = run(scenario())
    assert all(isinstance(r, BatchMismatch) for r in results)


def test_timeout_gathers_late_arrivals():
    async def scenario():
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue=8, batch_timeout_s=0.5)
        batcher.start()
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.submit(2))
        await asyncio.gather(first, second)
        await batcher.close()
        return model.calls

    assert run(scenario()) == [[1, 2]]


def test_timeout_stops_waiting_once_full():
    async def scenario():
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=2, max_queue=8, batch_timeout_s=30)
        batcher.start()
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2))
        await batcher.close()
        return model.calls, results

    calls, results = run(scenario())  # would hit the 10 s guard if it waited 30 s
    assert calls == [[1, 2]] and results == [10, 20]


def test_close_drains_queue_then_refuses():
    async def scenario():
        model = GatedModel()
        model.gate.clear()
        batcher = DynamicBatcher(model, max_batch_size=1, max_queue=8)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await model.started.wait()
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(ModelNotReady):
            await batcher.submit(9)
        model.gate.set()
        await closing
        return await asyncio.gather(*tasks)

    assert run(scenario()) == [0, 10, 20]


def test_cancelled_waiter_is_skipped():
    async def scenario():
        model = GatedModel()
        model.gate.clear()
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue=8)
        batcher.start()
        first = asyncio.create_task(batcher.submit(0))
        await model.started.wait()
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        results = await asyncio.gather(first, kept)
        await batcher.close()
        return model.calls, results

    calls, results = run(scenario())
    assert calls == [[0], [2]] and results == [0, 20]


class PoisonedModel(GatedModel):
    """Fails any batch holding a negative payload, as one bad request would."""

    async def __call__(self, payloads):
        self.calls.append(list(payloads))
        self.started.set()
        await self.gate.wait()
        if any(p < 0 for p in payloads):
            raise ValueError(f"bad payload in {payloads}")
        return [p * 10 for p in payloads]


async def _busy_then_batch(batcher, model, payloads):
    """Hold the model busy so `payloads` queue up and run as one batch."""
    model.gate.clear()
    first = asyncio.ensure_future(batcher.submit(100))
    await model.started.wait()
    rest = [asyncio.ensure_future(batcher.submit(p)) for p in payloads]
    await asyncio.sleep(0)
    model.gate.set()
    return [await first, *await asyncio.gather(*rest, return_exceptions=True)]


def test_a_failed_batch_is_retried_alone_so_only_the_culprit_fails():
    async def scenario():
        model = PoisonedModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=8)
        batcher.start()
        results = await _busy_then_batch(batcher, model, [1, -1, 2])
        await batcher.close()
        return model.calls, results

    calls, results = run(scenario())
    assert results[0] == 1000 and results[1] == 10 and results[3] == 20
    assert isinstance(results[2], ValueError)
    assert calls == [[100], [1, -1, 2], [1], [-1], [2]]


def test_an_error_that_is_not_retried_reaches_every_member():
    async def scenario():
        model = PoisonedModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=8,
                                 retry_alone=lambda exc: False)
        batcher.start()
        results = await _busy_then_batch(batcher, model, [1, -1, 2])
        await batcher.close()
        return model.calls, results

    calls, results = run(scenario())
    assert all(isinstance(r, ValueError) for r in results[1:])
    assert calls == [[100], [1, -1, 2]]


def test_fail_waiting_answers_the_queue_and_spares_the_running_batch():
    async def scenario():
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=1, max_queue=8)
        batcher.start()
        model.gate.clear()
        running = asyncio.ensure_future(batcher.submit(1))
        await model.started.wait()
        queued = [asyncio.ensure_future(batcher.submit(p)) for p in (2, 3)]
        await asyncio.sleep(0)
        failed = batcher.fail_waiting(ModelNotReady("shutting down"))
        model.gate.set()
        results = [await running, *await asyncio.gather(*queued, return_exceptions=True)]
        await batcher.close()
        return failed, results

    failed, results = run(scenario())
    assert failed == 2 and results[0] == 10
    assert all(isinstance(r, ModelNotReady) for r in results[1:])
