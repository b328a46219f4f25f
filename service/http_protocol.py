"""uvicorn's h11 protocol with a deadline on request headers (slow-loris defence).

uvicorn closes idle keep-alive connections, but a connection that sends a request's headers one
byte at a time is held open for ever: the ASGI app never sees it, so no middleware can time it out.
This protocol gives every request ``header_timeout_s`` from its first byte (or from the connection's
opening) to complete its headers, else answers 408 and closes. The body's deadline is the
middleware's (``RequestContextMiddleware``), and the number of connections is bounded by uvicorn's
``limit_concurrency`` (``DDPM_MAX_CONNECTIONS``). Built on uvicorn's H11Protocol internals
(``cycle``, ``transport``, ``loop``); ``tests/test_slow_clients.py`` pins them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"detail": f"request headers not received within {seconds:g} s"}).encode()
    head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


def header_deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class whose requests must complete their headers within ``header_timeout_s``."""

    class HeaderDeadlineH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if not self._between_requests():
                self._disarm()  # headers complete: the request is the app's now

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.write(_timeout_response(header_timeout_s))
                self.transport.close()

    return HeaderDeadlineH11Protocol
