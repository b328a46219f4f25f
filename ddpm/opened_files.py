"""Which files under a directory this process opens while it is watched, from Python's audit events (PEP 578).

``ddpm/compile_cache.py`` watches the local inductor cache while the graphs compile, so that the copy it writes holds
the entries this compile read or wrote, not whatever else the directory held (an earlier version's graphs it was
seeded with, another program's). Seen, in any thread: a file opened by Python (``open``, ``os.open``: reads and
writes), a temporary file renamed into place (under its final name: inductor writes its entries that way), and an
extension module loaded from a file (inductor's CPU kernels: a ``.so`` imported as a module). A file a C library
opens by itself is not seen: a caller keeps what it cannot account for (compile_cache keeps whole any directory it
does not know the layout of).

The hook stays installed once added (audit hooks cannot be removed); while nothing is watched it returns at its
first test.
"""

from __future__ import annotations

import os
import sys
import threading

_EVENTS = frozenset({"open", "os.rename", "import", "ctypes.dlopen"})
_watched: dict[str, set[str]] = {}  # root + os.sep -> absolute paths seen under it
_lock = threading.Lock()
_installed = False


def _path_of(event: str, args: tuple[object, ...]) -> object:
    if event == "os.rename":  # (src, dst, src_dir_fd, dst_dir_fd): what lands is dst
        return args[1]
    if event == "import":  # (module, filename, sys.path, sys.meta_path, sys.path_hooks); filename None for most
        return args[1]
    return args[0]  # open: (path, mode, flags); ctypes.dlopen: (name,)


def _hook(event: str, args: tuple[object, ...]) -> None:
    if not _watched or event not in _EVENTS:
        return
    path = _path_of(event, args)
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor, or None
    try:
        name = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return
    for root, seen in list(_watched.items()):
        if name.startswith(root):
            seen.add(name)


def watch(root: str | os.PathLike[str]) -> None:
    """Start recording what is opened under ``root`` (again from nothing, where it was watched already)."""
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True
        _watched[os.path.join(os.path.abspath(root), "")] = set()


def stop(root: str | os.PathLike[str]) -> set[str] | None:
    """Stop watching ``root``: the paths seen under it, relative to it (None where it was not watched)."""
    prefix = os.path.join(os.path.abspath(root), "")
    with _lock:
        seen = _watched.pop(prefix, None)
    return None if seen is None else {name[len(prefix):] for name in seen}
