"""Leaving a ``ddpm`` command at once, its message and logs flushed: no normal interpreter exit.

A thread may still be inside torch (the server's loader, engine or compile thread; inductor under an
interrupted command), and the interpreter's finalization under it aborts the process (exit 134).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_at_once(message: str, code: int = 1) -> NoReturn:
    """Exit without a normal interpreter exit: the loader or engine thread may be inside a device call, a compile or
    the warm-up, and finalizing under it aborts the process (SIGABRT, "terminate called without an active exception":
    a stalled engine did, and so did a port already in use or a SIGTERM while the model was still loading: exit 134)."""
    logging.disable(logging.CRITICAL)  # the message is the last line: no other thread's record after it (a compile
    logging.shutdown()  # thread's, with compile-cache's log at INFO); an emit in progress ends first (its handler's lock)
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
