"""What tells a followed file's change (the token file, the TLS certificate and key): its inode, time and size."""

from __future__ import annotations

import os
from pathlib import Path


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is written or replaced (a Secret volume swaps a symlink: a new inode); None: unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
