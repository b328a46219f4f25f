"""The server's event loop: asyncio's, with its accept loop stopping at the first "out of descriptors" error, and a TLS
handshake held to the server's read deadline.

CPython's ``_accept_connection`` (3.11, 3.12; python/cpython#151615, fixed in later releases) takes up to ``backlog``
(2,048) connections per wake-up; on EMFILE it logs, removes the reader and schedules a retry in one second, and then
carries on looping: 2,048 failed accepts, log records and retries each time. Measured (round thirteen, a hard limit
of 128 descriptors, 150 idle connections held): 194,120 accept errors in 10 s, and ~19,000 accepts a second of CPU
after the log was quieted. Here the listening socket is handed to that loop behind a wrapper whose ``accept`` reports
"no more waiting" (BlockingIOError, the loop's own way out) once a resource error was raised: one failed accept and
one retry a second, whatever the Python version's loop looks like inside.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _AcceptUntilOutOfResources:
    """A listening socket whose ``accept`` raises BlockingIOError after it raised a resource error once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._exhausted = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._exhausted:
            raise BlockingIOError(errno.EAGAIN, "stopped after running out of descriptors: retried in a second")
        try:
            return self.sock.accept()
        except OSError as exc:
            self._exhausted = exc.errno in RESOURCE_ERRORS
            raise

    def __getattr__(self, name: str) -> Any:  # fileno, family, ...: the socket's
        return getattr(self.sock, name)


class AcceptBackoffLoop(asyncio.SelectorEventLoop):
    # a TLS connection's handshake must end within this (set_handshake_timeout): asyncio waits 60 s, and until the
    # handshake ends the connection is none of uvicorn's (no header deadline, not counted in DDPM_MAX_CONNECTIONS)
    handshake_timeout_s: float | None = None

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None and self.handshake_timeout_s:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout_s
        return await super().create_server(*args, **kwargs)

    def _accept_connection(self, protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> None:
        while isinstance(sock, _AcceptUntilOutOfResources):  # the retry passes back what it was given
            sock = sock.sock
        super()._accept_connection(protocol_factory, _AcceptUntilOutOfResources(sock), *args, **kwargs)  # type: ignore[misc]


def set_handshake_timeout(seconds: float) -> None:
    """The TLS handshake's deadline on the loops made from now on (``ddpm serve``: DDPM_REQUEST_READ_TIMEOUT_S, the
    deadline a request's headers have once the connection is open). uvloop takes its own (60 s)."""
    AcceptBackoffLoop.handshake_timeout_s = seconds


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop factory (``loop="service.accept_backoff:new_event_loop"``): uvloop where it is installed (libuv
    handles EMFILE itself), else asyncio's with the accept fix."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return AcceptBackoffLoop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]
