"""Where a command writes its images, checked before the work, not after it: ``ddpm sample`` and ``eval``
sample for minutes, ``ddpm generate`` makes a server do it, and a bad name or folder found at the end
loses all of that."""

from __future__ import annotations

from pathlib import Path


def writable_output(command: str, flag: str, text: str | None, arrays: bool) -> Path | None:
    """``text`` as a path: a name whose image format Pillow writes (or ``.npy`` where ``arrays``), its folder made;
    otherwise ``SystemExit`` with one line naming the flag."""
    if text is None:
        return None
    from ddpm.grid import file_format

    path = Path(text)
    if file_format(path.suffix) is None and not (arrays and path.suffix == ".npy"):
        raise SystemExit(f"{command}: {flag} {text}: not an image file name (.png{', .npy' if arrays else ''}, .jpg, ...)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"{command}: {flag} {text}: {exc}") from exc
    return path
