"""The open-file limit (``ulimit -n``, RLIMIT_NOFILE) of a server that holds a socket per connection.

Measured (2-core Xeon, a real ``ddpm serve`` under ``ulimit -n 128``, 150 idle connections held): every file
descriptor in use, the probes' connections were not accepted (/healthz timed out for the 10 s until the idle ones
were closed), and asyncio logged "socket.accept() out of system resource" with a traceback **65,384 times in those
10 s** (its accept loop logs once per backlog slot, 2,048 of them, and retries each second). The connection bound
(``DDPM_MAX_CONNECTIONS``, 1,024 by default) cannot prevent it: an idle connection holds a descriptor before it is
counted, and systemd starts services with a soft limit of 1,024.

So the server raises its soft limit towards its hard one at start (as Go's runtime does for every program; raising it
needs no privilege), to ``ENOUGH`` or what the bound needs, says so where even the hard limit leaves too few for the
bound, and logs a run of accept errors once in ``QUIET_S`` seconds with the count of those it held back. Where the
descriptors are all in use even so, the accept loop itself waits a second between tries rather than spinning
(``service.accept_backoff``).
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable

RESERVED = 128  # descriptors besides the connections: the model and compile files, logs, /proc reads, probes past the bound
ENOUGH = 65_536  # the soft limit is raised this far (or to what the bound needs, if more), not to a hard limit of millions:
# a child that loops over every possible descriptor (a C program's close-all at its start) pays for each
QUIET_S = 10.0


def raise_open_file_limit(max_connections: int) -> str | None:
    """The soft limit raised to ``ENOUGH`` (or ``max_connections`` + RESERVED, if more) within the hard one; a warning
    where it stays below ``max_connections`` + RESERVED."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + RESERVED
    wanted = max(need, ENOUGH)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError):  # a sandbox that refuses it: the limit stays, and is judged below
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    return (f"open files are limited to {soft} (ulimit -n; hard limit {hard}), fewer than DDPM_MAX_CONNECTIONS={max_connections} "
            f"connections and {RESERVED} more need: past {max(soft - RESERVED, 0)} connections new ones are not accepted (not even "
            "/healthz) until some close; raise the hard limit (systemd LimitNOFILE=, docker run --ulimit nofile=N:N) or lower "
            "DDPM_MAX_CONNECTIONS")  # fmt: skip


class AcceptErrorsQuieted(logging.Filter):
    """asyncio's "socket.accept() out of system resource" once in ``QUIET_S`` seconds, saying how many it held back."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        with self._lock:
            now = self._clock()
            if now - self._last < QUIET_S:
                self._held += 1
                return False
            held, self._held, self._last = self._held, 0, now
        record.msg = (f"{self.MESSAGE}: every file descriptor is in use (ulimit -n), so new connections wait unaccepted"
                      + (f"; {held} more of these in the last {QUIET_S:g} s not logged" if held else ""))  # fmt: skip
        record.args, record.exc_info, record.exc_text = (), None, None  # the same traceback each time: asyncio's accept loop
        return True


def quiet_accept_errors() -> None:
    logging.getLogger("asyncio").addFilter(AcceptErrorsQuieted())
