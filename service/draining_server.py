"""``ddpm serve``'s uvicorn server: one worker (one process owns the device) and a draining shutdown.

On SIGTERM, SIGINT or SIGHUP (a terminal that hung up) the server stops accepting connections (a load balancer's next connection
fails over to another replica; the request never reached this one), serves the first request of a
connection it accepted before that (the balancer sent it here and will not re-send a POST:
``service/api/drain_admission.py``), answers 503 to other new requests on connections already open
(readyz too), lets in-flight requests finish for up to
DDPM_DRAIN_TIMEOUT_S, answers whatever is still running at that deadline with 503 + Retry-After,
then exits 0. Until then it also waits for the first request of each connection accepted before the
drain (sent, or still to come within its header deadline) to be answered: uvicorn's shutdown closes a
connection with no request in progress, and the balancer would answer that request 502. A second
signal (Ctrl-C again) stops at once: every request in flight is answered 503 + Retry-After (another
replica can take it), and the process exits 128 + the signal's number within about a second, without
uvicorn's shutdown or a normal interpreter exit (the engine thread may be inside a U-Net call: cancelling
the handlers answered them 500, and finalizing under that thread aborted the process, exit 134).

A server that can never serve exits non-zero with the reason, so that the orchestrator restarts it:
when the model fails to load, or when the engine thread dies.

Connections: uvicorn's proxy-header rewriting is off (the client identity policy is the project's,
``DDPM_TRUST_FORWARDED_FOR``), connections are bounded (``DDPM_MAX_CONNECTIONS``; more get 503, except
the probes and metrics, which a full server still answers), and a request's headers and body must
each arrive within ``DDPM_REQUEST_READ_TIMEOUT_S`` (408; a connection that sends nothing is closed
then too, and counted). ``service.api.http_protocol`` has the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

log = logging.getLogger("ddpm.server")
GRACEFUL_CLOSE_S = 5.0  # after the drain: time for answered connections to close
STOP_NOW_ANSWER_S = 1.0  # after a second signal: time for the 503s to be written before the process exits


class DrainingServer:
    """A uvicorn Server whose first exit signal drains the engine before uvicorn's own shutdown, and
    which stops with ``fatal`` set when the server can never serve (``state.on_fatal``)."""

    def __init__(self, config: Any, state: Any, drain_timeout_s: float, exit_now: Callable[[str, int], NoReturn]) -> None:
        """``exit_now(message, code)`` ends the process at once (``commands.process_exit.exit_at_once``)."""
        import uvicorn

        from service.engine.errors import DrainTimeout

        state_ref, timeout, outer = state, drain_timeout_s, self
        self.fatal: str | None = None

        class _Server(uvicorn.Server):
            draining = False
            stopping_now = False

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                """uvicorn's handlers for SIGINT and SIGTERM, except that a SIGINT ignored from the start stays ignored, as
                Python leaves it: a shell script's ``ddpm serve &`` starts with SIGINT ignored so that a Ctrl-C meant for
                the script's foreground command does not reach it (the terminal sends SIGINT to the whole process group),
                and uvicorn's handler drained the server on that Ctrl-C. SIGTERM is always a stop (an orchestrator's)."""
                ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                with super().capture_signals():
                    if ignored and threading.current_thread() is threading.main_thread():
                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                    yield

            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.draining:  # a second signal: answer what is in flight and leave now
                    if not self.stopping_now:
                        self.stopping_now = True
                        threading.Thread(target=self._stop_now, args=(sig,), name="ddpm-stop-now", daemon=True).start()
                    return
                self.draining = True
                log.info("signal %s: draining (up to %.0f s for in-flight requests; a second signal stops at once)", sig, timeout)
                state_ref.drain()
                try:
                    asyncio.get_running_loop().call_soon_threadsafe(self._close_listeners)
                except RuntimeError:  # no loop in this thread: uvicorn's own shutdown closes them
                    pass

                def finish() -> None:
                    engine, deadline = state_ref.engine, time.monotonic() + timeout
                    while True:  # the engine idle, and no connection accepted before the drain still owed its first answer
                        if engine is not None and not engine.wait_idle(max(0.0, deadline - time.monotonic())):
                            n = engine.abort(DrainTimeout(f"the server is shutting down (drain deadline {timeout:g} s passed); retry"))
                            log.warning("drain deadline: answered %d unfinished request(s) with 503", n)
                            engine.wait_idle(GRACEFUL_CLOSE_S)
                            break
                        if not self._first_answers_owed() or time.monotonic() >= deadline:
                            break
                        time.sleep(0.05)
                    self.should_exit = True

                threading.Thread(target=finish, name="ddpm-drain", daemon=True).start()

            def _stop_now(self, sig: int) -> None:
                engine, answered = state_ref.engine, 0
                if engine is not None:  # a stalled engine thread may hold the lock: then the clients see the connection close
                    error = DrainTimeout("the server is stopping at once (a second signal); retry")
                    answered = engine.abort(error, lock_timeout=STOP_NOW_ANSWER_S / 2)
                end = time.monotonic() + STOP_NOW_ANSWER_S
                while self.server_state.tasks and time.monotonic() < end:  # the handlers write their 503s
                    time.sleep(0.02)
                exit_now(f"ddpm serve: stopped at once by a second signal; {answered} request(s) in flight answered 503", 128 + sig)

            def _first_answers_owed(self) -> bool:
                """A connection accepted before the drain whose first request has not arrived or not been answered: uvicorn's
                shutdown would close it (its header deadline bounds how long it can stay silent). The connections are
                ``hardened_protocol``'s; ``list`` copies the loop thread's set in one step under the GIL."""
                return any(c.owes_first_answer() for c in list(self.server_state.connections))

            def _close_listeners(self) -> None:
                for listener in getattr(self, "servers", []):
                    listener.close()  # stop accepting; open connections stay
                state_ref.listeners_closed = time.monotonic()  # a connection accepted before: its first request is served

        self._server = _Server(config)
        state.metrics.watch_connections(lambda: len(self._server.server_state.connections))

        def on_fatal(reason: str) -> None:
            outer.fatal = reason
            log.critical("cannot serve, exiting: %s", reason)
            state_ref.drain()
            time.sleep(0.2)  # let the answers to the failed requests go out
            self._server.should_exit = True

        state.on_fatal = on_fatal

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until a signal's drain ends: uvicorn takes SIGINT and SIGTERM; SIGHUP (the terminal ``ddpm serve`` ran
        on hung up) drains too, its output sent to /dev/null first (``ddpm.terminal_hangup``): it was killed at once,
        every request in flight with it (their clients saw the connection reset)."""
        from ddpm.terminal_hangup import handle_unless_ignored, off_the_terminal

        def hung_up(sig: int, frame: Any) -> None:
            off_the_terminal()
            self._server.handle_exit(sig, frame)

        main = threading.current_thread() is threading.main_thread()
        previous = handle_unless_ignored((signal.SIGHUP,), hung_up) if main else {}  # under nohup it stays ignored
        try:
            self._server.run(sockets)  # sockets: bound already (service.listening_socket), else uvicorn binds its host
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
