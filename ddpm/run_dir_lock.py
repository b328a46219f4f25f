"""One run at a time in a run directory: ``ddpm train`` and ``ddpm distill`` hold an exclusive lock on it.

Two runs in one directory (the same command started again in another terminal while the first still runs under
``nohup``) both trained to the end and both exited 0, each writing ``state.pt``, the loss curve and the model over the
other's: the directory ended as whichever wrote last, at twice the CPU time. Now the second one is refused at once,
naming the first (pid, host, command, start). The lock is ``flock`` on ``<run dir>/.lock``: the kernel drops it when its
holder exits however it exits (a kill -9 leaves no stale lock), and the file stays, holding the last holder's facts.
A directory where the lock cannot be taken at all (read-only: a finished run looked at; a file system without
``flock``) is used without one, as before.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"
_UNLOCKABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunDirInUse(RuntimeError):
    """Another process holds the run directory."""


@contextmanager
def held(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold ``run_dir`` for this process while the block runs; ``RunDirInUse`` (naming the holder) where another holds it."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in _UNLOCKABLE:
            raise
        yield  # nothing here can be written by anyone this user could race with
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(f"{run_dir} is in use by {_holder(fd)}: wait for it to end or stop it first "
                              f"(two runs in one directory write over each other's checkpoints)") from None
        except OSError as exc:
            if exc.errno not in _UNLOCKABLE:
                raise
        else:
            _record(fd, command)
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor


def _record(fd: int, command: str) -> None:
    facts = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(facts).encode() + b"\n", 0)


def _holder(fd: int) -> str:
    """The holder's facts as it wrote them: another run of ``ddpm`` (pid 123 on host, since ...: ddpm train ...)."""
    try:
        facts = json.loads(os.pread(fd, 4096, 0) or b"{}")
        where = f" on {facts['host']}" if facts.get("host") not in (None, socket.gethostname()) else ""
        return f"another run (pid {facts['pid']}{where}, since {facts['since']}: {facts['command']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its facts yet, or wrote garbage
        return "another run"

