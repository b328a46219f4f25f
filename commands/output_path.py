"""Where a command writes, checked before the work, not after it: ``ddpm sample`` and ``eval`` sample for
minutes, ``ddpm generate`` makes a server do it, ``ddpm compile-cache``, ``train-classifier`` and ``distill``
compile or train for minutes to hours, and a bad name or folder found at the end loses all of that."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def writable_output(command: str, flag: str, text: str | None, arrays: bool, folders: bool = False) -> Path | None:
    """``text`` as a path: a name whose image format Pillow writes (or ``.npy`` where ``arrays``), its folder made;
    otherwise ``SystemExit`` with one line naming the flag (and where ``folders``, that a folder ends in a slash)."""
    if text is None:
        return None
    from ddpm.grid import file_format

    path = Path(text)
    if file_format(path.suffix) is None and not (arrays and path.suffix == ".npy"):
        folder = f"; a folder of one PNG per image: {text.rstrip('.')}/" if folders else ""
        raise SystemExit(f"{command}: {flag} {text}: not an image file name (.png{', .npy' if arrays else ''}, .jpg, ...){folder}")
    _probe(command, flag, text, path.parent)
    _not_a_directory(command, flag, text, path)
    return path


def folder_output(text: str) -> bool:
    """``-o`` names a folder (``ddpm generate``'s one PNG per image): a name ending in a slash, or a folder that is there
    and has no file name's suffix (a folder named grid.png is refused as ``writable_output`` says)."""
    return text.endswith(("/", os.sep)) or (Path(text).is_dir() and not Path(text).suffix)


def writable_directory(command: str, flag: str, text: str) -> Path:
    """``text`` as a directory: made if missing, and a file can be written there; otherwise ``SystemExit`` with one line."""
    _probe(command, flag, text, Path(text))
    return Path(text)


def writable_file(command: str, flag: str, text: str | None) -> Path | None:
    """``text`` as a file to write at the end (a report): its folder made and writable; otherwise one line."""
    if text is None:
        return None
    _probe(command, flag, text, Path(text).parent)
    _not_a_directory(command, flag, text, Path(text))
    return Path(text)


def _not_a_directory(command: str, flag: str, text: str, path: Path) -> None:
    """A folder under the file's name would refuse the write at the end, after the work."""
    if path.is_dir():
        raise SystemExit(f"{command}: {flag} {text}: a folder is there; name a file in it, or another file")


def _probe(command: str, flag: str, text: str, directory: Path) -> None:
    """``directory`` made if missing and a file written there, or ``SystemExit`` naming the flag and its value."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise SystemExit(f"{command}: {flag} {text}: {exc}") from exc


def written(command: str, flag: str, path: object, write: Callable[[], object]) -> None:
    """The output, written at the end (whole or not at all: ``ddpm.atomic_file``); one line naming the flag where it
    cannot be (the folder went away or filled up during the work)."""
    try:
        write()
    except OSError as exc:
        raise SystemExit(f"{command}: {flag} {path}: {exc}") from exc
