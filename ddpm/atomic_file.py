"""A file written whole or not at all: through a temporary file beside it and a rename.

A crash, a Ctrl-C or a full disk never leaves a half-written file, nor the temporary one, and the file it was to
replace stays as it was. ``ddpm sample -o x.npy`` on a full disk left a truncated x.npy in place of the one there
before, saying only "50176 requested and 25568 written" (numpy's words); a PNG, an empty file.

A symbolic link is written through, as ``>`` writes through it: its file is replaced and the link stays (a rename onto
the link's own name replaced the link with a plain file and left its file as it was). The temporary file's name fits
the file system's 255 bytes wherever the file's own does (``x.png.`` plus 8 characters failed for a legal name of 250
bytes, after the work). A file replaced keeps its permissions (a private 0600 file became 0644: readable by anyone).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm.free_space import space_left

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


class WriteError(OSError):
    """A file could not be written (a full disk, most often); the file it was to replace is unchanged."""


def atomic_write(path: Path, write: Callable[[str], object], also: tuple[type[BaseException], ...] = ()) -> None:
    """``write(temporary path)``, then the rename; WriteError names the file and the space left where the writer
    failed with an OSError, a RuntimeError (torch's zip writer says "unexpected pos 306176 vs 306128" for a full disk)
    or one of ``also``."""
    path = Path(path)
    target = Path(os.path.realpath(path))  # a link's file, through every link on the way
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temporary_prefix(target.name))
    except OSError as exc:  # the directory went away, or cannot be written
        raise WriteError(_cannot_write(path, exc)) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(target))  # mkstemp's 0600 would hide a model from a non-root server
        os.replace(tmp, target)
    except (OSError, RuntimeError, *also) as exc:
        raise WriteError(_cannot_write(path, exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mode_for(target: Path) -> int:
    """The permissions of the file replaced (a private 0600 image stays private), or a new file's (0666 less the umask)."""
    try:
        return os.stat(target).st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` sets it to read it: a thread creating a file in that
    moment would create it 0666)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _temporary_prefix(name: str) -> str:
    """A hidden name beside the file: a dot, the name's first 200 bytes (whole characters), a dot; mkstemp adds 8."""
    return "." + os.fsencode(name)[:200].decode("utf-8", "ignore") + "."


def _cannot_write(path: Path, exc: BaseException) -> str:
    return f"could not write {path} ({type(exc).__name__}: {exc}{space_left(path.parent)})"


def write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` whole or not at all (through a file object: ``np.save`` adds ".npy" to a name without it)."""
    import numpy as np

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, save)


def write_picture(path: Path, image: Image.Image, format: str) -> None:
    """A Pillow image in ``format`` whole or not at all (the temporary file's name says no format)."""
    atomic_write(path, lambda tmp: image.save(tmp, format=format))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
