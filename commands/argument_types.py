"""Typed command-line values, checked by argparse (a usage line naming the flag, exit 2) before any work: ``-n 0``
ended in a torch traceback, ``--steps 0`` ran the whole 1000-step chain as if no count were given, ``--port 99999``
died in the socket's bind with a C++ abort."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ddpm.seeding import MAX_SEED


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high] (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}" if high is None else f"must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message for a ValueError only
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
PORT = int_at_least(0, 65535)
SEED = int_at_least(0, MAX_SEED - 1)
