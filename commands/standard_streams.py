"""Standard streams a shell closed, or whose reader went away, under a ``ddpm`` command.

- **Closed** (``ddpm train 2>&-``, a supervisor that starts with no descriptors): Python sets ``sys.stderr`` to None,
  and the first progress bar raised AttributeError that no one could print: ``ddpm train`` and ``sample`` ended with
  exit 1, no line and no output. Worse, the next file opened takes the free descriptor 2, and whatever a library writes
  to "standard error" lands in that file (a checkpoint, an image). A closed 0, 1 or 2 is opened on /dev/null first,
  as a daemon's start does.
- **A reader that went away** (``ddpm info | head -1``, ``| true``): printing raised BrokenPipeError, a traceback.
  The command stops quietly with the status a process killed by SIGPIPE gives (141), as C tools do.
"""

from __future__ import annotations

import os
import select
import sys

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell sees from ``cat big | head -1``


def open_closed_streams() -> None:
    """Descriptors 0, 1 and 2 that are closed: opened on /dev/null, and ``sys.stdin/stdout/stderr`` made for them."""
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        _null_onto(fd, mode)
        stream = open(fd, "r" if fd == 0 else "w", closefd=False, encoding="locale", errors="backslashreplace")  # kept open for the process
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def stdout_reader_gone() -> bool:
    """Standard output is a pipe or socket whose reader closed it (poll reports an error on it)."""
    try:
        poll = select.poll()
        poll.register(1, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False


def quiet_on_closed_stdout() -> int:
    """After BrokenPipeError on standard output: it goes to /dev/null (Python's flush at exit would fail again and
    print "Exception ignored"), and the exit status is SIGPIPE's."""
    _null_onto(1, os.O_WRONLY)
    return SIGPIPE_EXIT


def _null_onto(fd: int, mode: int) -> None:
    """Descriptor ``fd`` on /dev/null (opened there directly where it is the lowest free one: a closed ``fd``)."""
    null = os.open(os.devnull, mode)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)
