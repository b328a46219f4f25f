"""uvicorn's h11 protocol, hardened: header deadlines, probes that a full server still answers, and an
honest count of answers nobody received.

- **Header deadline** (slow loris): uvicorn closes idle keep-alive connections, but a connection that
  never sends a request, or sends its headers one byte at a time, is held open for ever: the ASGI
  app never sees it, so no middleware can time it out. Every request gets ``header_timeout_s`` from
  its first byte (or from the connection's opening) to complete its headers, else 408 and close;
  each such close is counted (``on_deadline("idle" | "headers")``: a connection that sent nothing at
  all, or an incomplete request).
- **Probes past the connection limit**: uvicorn's ``limit_concurrency`` (``DDPM_MAX_CONNECTIONS``)
  answers 503 to every request once that many connections are open, idle ones included, so anyone
  able to open sockets could fail a replica's liveness probe and have the orchestrator kill it with
  its work. Requests for ``PROBE_PATHS`` (liveness, readiness, metrics) are exempt: the limit is
  checked for every other path, exactly as uvicorn checks it.
- **A client gone before its answer**: a FIN that arrives while a request is in progress ends the
  connection, as uvicorn and nginx treat it (``proxy_ignore_client_abort off``): TCP cannot tell a
  client that only shut down its write side from one that left, and keeping such connections open
  would make every vanished client hold its images to the end of the chain (the engine cancels them
  instead: ``tests/test_server_process.py``). What was missing is the count: an answer the route
  produced after that (a cached one, a chain that finished in the same moment) went nowhere while
  the access log and the metrics said 200. The request's state now carries ``client_gone``, and
  ``RequestContextMiddleware`` records such a request as 499. Where uvicorn itself refuses a request mid-body
  with a 400 (a malformed chunk), the state carries ``protocol_refused`` and the request is recorded 400,
  not as the app's ``ClientDisconnect``.
- **Which request of its connection**: each request's ``scope["state"]`` carries ``connection_opened`` (when
  this connection was accepted, monotonic) and ``nth_on_connection`` (1 for its first request). A draining
  server serves the first request of a connection it accepted before it closed its listeners: a load
  balancer sent it here before the replica left, and will not re-send a POST (``ServerState.routed_before_drain``).
  Until that request has been answered (``owes_first_answer``), the draining server does not exit: closing the
  connection then loses the request just as a 503 would (nginx answers 502). Its header deadline bounds the wait.

The body's deadline is the middleware's (``RequestContextMiddleware``). Built on uvicorn's
H11Protocol internals (``cycle``, ``scope``, ``transport``, ``loop``, ``limit_concurrency``, checked
by ``handle_events`` after ``scope`` is set); ``tests/test_slow_clients.py`` pins them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.request_target import origin_path

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DeadlineObserver = Callable[[str], None]  # "idle" (nothing received) or "headers" (an incomplete request)


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"detail": f"request headers not received within {seconds:g} s"}).encode()
    head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


# long: one class closed over its two settings (uvicorn instantiates the protocol class with arguments of its own)
def hardened_protocol(header_timeout_s: float, on_deadline: DeadlineObserver | None = None) -> type[H11Protocol]:
    """An H11Protocol class with the three defences of this module."""

    class HardenedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _received_any = False
        _limit: int | None = None
        _opened, _requests = 0.0, 0  # when the connection was accepted (monotonic); requests whose headers arrived on it

        # uvicorn reads self.limit_concurrency after it has built the new request's scope
        @property  # type: ignore[override]
        def limit_concurrency(self) -> int | None:
            scope = getattr(self, "scope", None)
            if scope is not None and origin_path(scope.get("path", "")) in PROBE_PATHS:
                return None
            return self._limit

        @limit_concurrency.setter
        def limit_concurrency(self, value: int | None) -> None:
            self._limit = value

        def connection_made(self, transport: Any) -> None:
            self._opened = time.monotonic()
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._received_any = True
            if self._between_requests():
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if not self._between_requests():
                self._disarm()  # headers complete: the request is the app's now
                if "nth_on_connection" not in self.scope["state"]:  # this request's first data past its headers
                    self._requests += 1
                    self.scope["state"].update(connection_opened=self._opened, nth_on_connection=self._requests)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if not self._between_requests():  # the answer was not (completely) written: nobody receives it
                self.scope["state"]["client_gone"] = True  # the same dict as the request's scope["state"]
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            if not self._between_requests():  # refused mid-body (a bad chunk): the app sees a disconnect, the client this 400
                self.scope["state"]["protocol_refused"] = 400
            super().send_400_response(msg)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def owes_first_answer(self) -> bool:
            """Open, and its first request has not come or not been answered yet: a draining server waits for it."""
            return not self.transport.is_closing() and (self._requests == 0 or (self._requests == 1 and not self._between_requests()))

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
                if on_deadline is not None:
                    on_deadline("headers" if self._received_any else "idle")

    return HardenedH11Protocol
