"""A terminal that hangs up (SIGHUP: an SSH connection dropped, the window closed) under a long ``ddpm`` process.

The signal's default ends the process at once: a training run lost every step since its last checkpoint, a server
every request in flight. ``ddpm train``/``distill`` save and stop on it and ``ddpm serve`` drains, as on SIGTERM; first
their standard output and error, where they were that terminal, go to /dev/null, as ``nohup`` would have sent them: a
write to a terminal that hung up fails (EIO), and it ended the run before its save. Under ``nohup`` (SIGHUP ignored
from the start) none of this: the hangup stays ignored, as asked.
"""

from __future__ import annotations

import os
import signal
import stat
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each asks a run to save and stop, a server to drain


def off_the_terminal() -> None:
    """Point standard output and error that are a terminal at /dev/null. A terminal is told by its kind, a character
    device other than /dev/null: ``isatty`` on one that hung up is already False."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        null_device = os.fstat(null).st_rdev
        for fd in (1, 2):
            try:
                st = os.fstat(fd)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev != null_device:
                    os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


def handle_unless_ignored(signums: tuple[int, ...], handler: Any) -> dict[int, Any]:
    """``handler`` for each signal the process was not started ignoring; the handlers replaced, to put back. A signal
    ignored from the start stays ignored, as Python leaves an ignored SIGINT: ``nohup ddpm train ... &`` asks for SIGHUP
    to be ignored, and the run stopped (saved and exited) when the terminal closed, a server drained and exited (measured:
    ``ddpm serve`` started with SIGHUP ignored, sent SIGHUP: exit 0 within 3 s)."""
    replaced = {}
    for signum in signums:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            replaced[signum] = signal.signal(signum, handler)
    return replaced
