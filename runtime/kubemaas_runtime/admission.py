"""Admission: the one place that decides whether a request may go on, and counts it.

A request is read first (within a deadline and a size limit, its bytes charged to a memory
budget shared by every request), and only then takes an in-flight slot: so clients that send
their bodies slowly hold neither slots nor more memory than they have sent, and
`kubemaas_inflight_requests` (what the autoscaler reads) counts work the server really has.

Every inference route, v2 and OpenAI-style alike, goes through `Admission.endpoint` (error
mapping and request metrics), `read_body` and `in_flight`:

    @admission.endpoint
    async def infer(request, ticket):
        body = await admission.read_body(request, ticket)
        with admission.in_flight():
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

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


class Ticket:
    """One request's share of the memory budget, released when its answer is sent."""

    __slots__ = ("_admission", "charged")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.charged = 0

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

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """A slot for a request whose body has arrived: 503 when every slot is taken or the
        model's queue is full. Counted in kubemaas_inflight_requests while held."""
        if self._queue_full():
            raise Overloaded("request queue is full (--max-queue); retry later")
        if self._inflight >= self.limits.max_inflight:
            raise Overloaded(f"{self._inflight} requests are in flight (the limit is "
                             f"{self.limits.max_inflight}); retry later")
        self._inflight += 1
        self._metrics.inflight.inc()
        try:
            yield
        finally:
            self._inflight -= 1
            self._metrics.inflight.dec()

    def endpoint(self, handler: Callable[[Request, Ticket], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        """A route from `handler`: domain errors mapped to their status, anything else a 500
        (logged; the server keeps serving), the request counted and timed, the ticket's share
        of the budget returned once the answer is built."""

        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            started = time.perf_counter()
            ticket = Ticket(self)
            try:
                response = await handler(request, ticket)
            except RuntimeServeError as exc:
                response = error_response(exc)
            except ClientGone:
                response = Response(status_code=499)  # never sent: the client is gone
            except Exception as exc:  # a bug or a failing forward: 500, and keep serving
                log.exception("request failed")
                response = error_response(exc)
            finally:
                ticket.release()
            metrics = self._metrics
            if response.status_code != 200:
                metrics.failure(response.status_code)
            metrics.requests.inc()
            metrics.duration.observe(time.perf_counter() - started)
            return response

        return route
