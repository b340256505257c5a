"""uvicorn's httptools protocol with the two limits it lacks: a bound on the request line plus
headers (llhttp keeps no limit of its own), and a deadline for them to arrive (a client that
opens connections and dribbles headers would otherwise hold them for ever).

A request over either limit is answered 400 and its connection closed, before any ASGI code
runs. The body has its own deadline and size limit in `admission.py`.
"""

from __future__ import annotations

import asyncio

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderLimitExceeded(httptools.HttpParserCallbackError):
    """Raised from a parser callback: uvicorn answers 400 and closes the connection."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    header_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            raise HeaderLimitExceeded(
                f"request line and headers exceed {self.max_header_bytes} bytes")

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        loop = asyncio.get_running_loop()
        self._header_deadline = loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        # Idle keep-alive connections are uvicorn's (timeout_keep_alive); this one is part-way
        # through a request line or its headers, or never sent a byte.
        self._header_deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these limits."""
    return type("BoundedHttpTools", (BoundedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s})
