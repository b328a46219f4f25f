"""A command started in a folder that was removed (``rm -rf build && mkdir build`` from another shell, while this one
stood in ``build``): ``import torch`` ended the process with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
(exit 2, measured), and a relative path could name nothing. One line says what happened instead."""

from __future__ import annotations

import os


def refuse_a_removed_working_directory(command: str) -> None:
    """SystemExit naming the fix where the process's working directory no longer exists; nothing otherwise."""
    try:
        os.getcwd()
    except FileNotFoundError:
        again = os.environ.get("PWD", "")
        hint = f' (cd "{again}" where it was made again)' if again and os.path.isdir(again) else ""
        raise SystemExit(f"ddpm {command}: the current directory was removed: cd to a folder that exists{hint}") from None
