"""Free space where a write failed, for the messages that say so (a full disk, most often): a training run's files,
the compiled graphs' copy, the compile's own files."""

from __future__ import annotations

import shutil
from pathlib import Path


def free_mib(directory: str | Path) -> float | None:
    """MiB free on the file system holding ``directory``; None where it cannot be asked (the directory went away)."""
    try:
        return shutil.disk_usage(directory).free / 2**20
    except OSError:
        return None


def space_left(directory: str | Path) -> str:
    """"; 12.3 MiB free there" for a message about a failed write, or "" where it cannot be told."""
    free = free_mib(directory)
    return "" if free is None else f"; {free:.1f} MiB free there"
