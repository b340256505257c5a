"""Admission: the one place that decides whether a request may go on, and counts it.

A request is read first (within a deadline and a size limit, its bytes charged to a memory
budget shared by every request), and only then takes an in-flight slot: so clients that send
their bodies slowly hold neither slots nor more memory than they have sent, and
`kubemaas_inflight_requests` (what the autoscaler reads) counts work the server really has.

Every inference route, v2 and OpenAI-style alike, tensor and generation alike, goes through
`Admission.endpoint` (error mapping and request metrics), `read_body` and an in-flight slot:

    @admission.endpoint
    async def infer(request, ticket):
        body = await admission.read_body(request, ticket)
        with admission.in_flight():
            ...

A streamed answer (`EventStream`, Server-Sent Events) holds its slot past the handler:
`ticket.hold_slot()` takes it, and the endpoint frees it, counts and times the request when
the stream ends: after its last event, when the client goes away, or when the response was
never sent at all. A stream that ends in an error says so with `outcome.fail(status)`, and is
counted as that status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from kubemaas_runtime.errors import (
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    RuntimeServeError,
    error_response_parts,
)
from kubemaas_runtime.metrics import BoundMetrics

log = logging.getLogger("kubemaas_runtime")
JSON = "application/json"
# Python objects orjson makes per byte of JSON at worst (a one-digit number and its comma
# become a float object and a list slot): charged to the budget while a JSON part is parsed.
JSON_EXPANSION = 24
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # never sent: recorded in the failure counter only


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    max_inflight: int  # requests past their body and not yet answered
    max_request_bytes: int  # one body
    max_buffered_bytes: int  # every request's bodies and decoded tensors together
    body_timeout_s: float  # from the first header to the last body byte


class ClientGone(Exception):
    """The client closed the connection before its body arrived: nobody to answer."""


def error_response(exc: BaseException) -> Response:
    status, headers, body = error_response_parts(exc)
    return Response(body, status, headers=headers, media_type=JSON)


class StreamOutcome:
    """How a stream ended (200 unless its producer called `fail`), and what to do then:
    callbacks run exactly once, in order, when `end()` is first called."""

    def __init__(self) -> None:
        self.status = 200
        self._callbacks: list[Callable[[int], None]] = []
        self._ended = False

    def fail(self, status: int) -> None:
        self.status = status

    def on_end(self, callback: Callable[[int], None]) -> None:
        self._callbacks.append(callback)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        for callback in self._callbacks:
            try:
                callback(self.status)
            except Exception:
                log.exception("stream end callback failed")


class EventStream(StreamingResponse):
    """A Server-Sent Events answer that stays admitted until it ends (see the module doc).

    `outcome.end()` runs when the response has been sent, when sending it failed or was
    cancelled (the client left), or, if the response was never called, when it is collected."""

    def __init__(self, events: AsyncIterator[bytes], outcome: StreamOutcome) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.outcome = outcome
        self._finalizer = weakref.finalize(self, outcome.end)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finalizer()


class Ticket:
    """One request's share of the memory budget, released when its answer is built, and its
    in-flight slot when it holds one past the handler (`hold_slot`, for streams)."""

    __slots__ = ("_admission", "charged", "slot")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.charged = 0
        self.slot = False

    def hold_slot(self) -> None:
        """Take an in-flight slot (503 when none is free) until the answer ends: the
        handler's response, or a stream's last event."""
        if not self.slot:
            self._admission._acquire()
            self.slot = True

    def free_slot(self) -> None:
        if self.slot:
            self.slot = False
            self._admission._release()

    def charge(self, size: int) -> None:
        """Take `size` more bytes of the budget, or raise Overloaded (503) when it is spent."""
        self._admission._take(size)
        self.charged += size

    def refund(self, size: int) -> None:
        size = min(size, self.charged)
        self._admission._give(size)
        self.charged -= size

    def release(self) -> None:
        self.refund(self.charged)


class Admission:
    def __init__(self, limits: AdmissionLimits, metrics: BoundMetrics,
                 queue_full: Callable[[], bool] = lambda: False) -> None:
        self.limits = limits
        self._metrics = metrics
        self._queue_full = queue_full
        self._inflight = 0
        self._buffered = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    # -- the budget ------------------------------------------------------------------------
    def _take(self, size: int) -> None:
        if self._buffered + size > self.limits.max_buffered_bytes:
            raise Overloaded(
                f"the server holds {self._buffered} bytes of requests, and {size} more would pass "
                f"--max-buffered-bytes {self.limits.max_buffered_bytes}; retry later")
        self._buffered += size

    def _give(self, size: int) -> None:
        self._buffered -= size

    # -- stages of a request ---------------------------------------------------------------
    async def read_body(self, request: Request, ticket: Ticket) -> bytearray:
        """The whole body, within the size limit and the deadline (413, 408), each chunk
        charged to the budget as it arrives (503 when spent)."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidInput("Content-Length is not an integer")
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of "
                                      f"{limit} (--max-request-bytes)")
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                async for chunk in request.stream():
                    if len(body) + len(chunk) > limit:
                        raise PayloadTooLarge(f"request body exceeds the limit of {limit} "
                                              f"bytes (--max-request-bytes)")
                    ticket.charge(len(chunk))
                    body += chunk
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.limits.body_timeout_s:g}s "
                f"(--body-timeout-seconds)") from None
        except ClientDisconnect:
            raise ClientGone() from None
        return body

    def _acquire(self) -> None:
        """A slot for a request whose body has arrived: 503 when every slot is taken or the
        model's queue is full. Counted in kubemaas_inflight_requests while held."""
        if self._queue_full():
            raise Overloaded("request queue is full (--max-queue); retry later")
        if self._inflight >= self.limits.max_inflight:
            raise Overloaded(f"{self._inflight} requests are in flight (the limit is "
                             f"{self.limits.max_inflight}); retry later")
        self._inflight += 1
        self._metrics.inflight.inc()

    def _release(self) -> None:
        self._inflight -= 1
        self._metrics.inflight.dec()

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """An in-flight slot (`_acquire`) for the duration of the block."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def _count(self, started: float, status: int) -> None:
        metrics = self._metrics
        if status != 200:
            metrics.failure(status)
        metrics.requests.inc()
        metrics.duration.observe(time.perf_counter() - started)

    def endpoint(self, handler: Callable[[Request, Ticket], Awaitable[Response]], *,
                 errors: Callable[[BaseException], Response] | None = None
                 ) -> Callable[[Request], Awaitable[Response]]:
        """A route from `handler`: domain errors mapped to their status (by `errors`, the v2
        shape unless given: /v1 answers in OpenAI's), anything else a 500 (logged; the server
        keeps serving), the request counted and timed, the ticket's share of the budget
        returned once the answer is built. An `EventStream` answer is counted, and its slot
        freed, when the stream ends."""
        answer = errors or error_response

        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            started = time.perf_counter()
            ticket = Ticket(self)
            try:
                response = await handler(request, ticket)
            except RuntimeServeError as exc:
                response = answer(exc)
            except ClientGone:
                response = Response(status_code=CLIENT_GONE)  # never sent: the client is gone
            except Exception as exc:  # a bug or a failing forward: 500, and keep serving
                log.exception("request failed")
                response = answer(exc)
            finally:
                ticket.release()
            if isinstance(response, EventStream):
                def end(status: int) -> None:
                    ticket.free_slot()
                    self._count(started, status)
                response.outcome.on_end(end)
                return response
            ticket.free_slot()
            self._count(started, response.status_code)
            return response

        return route
