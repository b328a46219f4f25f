"""Free space where a write failed, for the messages that say so (a full disk, most often): a training run's files,
the compiled graphs' copy, the compile's own files; and the process's file-size limit (``ulimit -f``) where one is set,
the other way a write runs out of room: a 30-step ``ddpm train`` under ``ulimit -f 50`` failed with "unexpected pos
51968 vs 51888; 70535.8 MiB free there ... free space and start again" (measured), advice that could not help."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path


def free_mib(directory: str | Path) -> float | None:
    """MiB free on the file system holding ``directory``; None where it cannot be asked (the directory went away)."""
    try:
        return shutil.disk_usage(directory).free / 2**20
    except OSError:
        return None


def file_size_limit() -> int | None:
    """The largest file this process may write, in bytes (``ulimit -f``, RLIMIT_FSIZE); None where unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def space_left(directory: str | Path) -> str:
    """"; 12.3 MiB free there" for a message about a failed write, and the file-size limit where one is set; "" where
    neither can be told."""
    free, limit = free_mib(directory), file_size_limit()
    said = "" if free is None else f"; {free:.1f} MiB free there"
    if limit is None:
        return said
    size = f"{limit / 2**10:.0f} KiB" if limit < 2**20 else f"{limit / 2**20:.1f} MiB"
    return f"{said}; files are limited to {size} (ulimit -f)"


def make_room() -> str:
    """What to do about a write that ran out of room: raise the file-size limit where one is set, else free space."""
    return "free space" if file_size_limit() is None else "raise the file-size limit (ulimit -f) or free space"
