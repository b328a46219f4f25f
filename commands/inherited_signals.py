"""Signals a ``ddpm`` process was started with blocked: the mask is inherited across exec, so a parent that blocked
SIGTERM (a supervisor's thread, a launcher that forgot to restore its mask) left ``ddpm serve`` deaf to it (measured:
SIGTERM sent, still serving 5 s later): ``docker stop`` and a pod's termination then end in SIGKILL, every request in
flight lost. The stop signals are unblocked at start, before any thread is made (a thread takes its maker's mask).
Their dispositions are another matter: one ignored from the start stays ignored (``ddpm.terminal_hangup``)."""

from __future__ import annotations

import signal

from ddpm.terminal_hangup import STOP_SIGNALS


def unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
