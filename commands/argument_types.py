"""Typed command-line values, checked by argparse (a usage line naming the flag, exit 2) before any work: ``-n 0``
ended in a torch traceback, ``--steps 0`` ran the whole 1000-step chain as if no count were given, ``--port 99999``
died in the socket's bind with a C++ abort."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from ddpm.names import MAX_THREADS, is_colour, is_text, text_name
from ddpm.seeding import MAX_SEED


def from_environment(name: str, default: str) -> str:
    """A flag's default from ``name`` where it is set and not blank, its surrounding whitespace dropped (an env file
    saved with Windows line ends gives every value a trailing CR), else ``default``."""
    return os.environ.get(name, "").strip() or default


def argument_text(text: str) -> str:
    """An argparse ``type`` for a name the user types (a class label): its bytes read as UTF-8 where the locale could
    not decode them. Under an ASCII locale (``LC_ALL=C`` with ``PYTHONUTF8=0``, a legacy system's POSIX locale) Python
    holds ``--class-label été``'s bytes as lone surrogates, and the model's class "été" was "unknown"; bytes that are not
    UTF-8 either (a Latin-1 terminal's) become the backslash escapes a model card holds for such a folder name."""
    return text if is_text(text) else text_name(os.fsencode(text).decode("utf-8", "surrogateescape"))


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
THREADS = int_at_least(0, MAX_THREADS)  # 0: PyTorch's default


def number_in(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in the interval from ``low`` to ``high`` (open at an end where said;
    no upper bound when ``high`` is None). ``--ema-decay -1`` was taken (its "average" e <- 2p - e), ``--lr 0`` trained nothing,
    and ``ddpm generate --eta nan`` was a JSON traceback."""
    interval = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}' + (')' if high_open else ']')}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def integer_list(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated positive integers (``1,2,2``), or nothing (an empty list)."""
    values = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer (comma-separated positive integers)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be positive integers, got {value}")
        values.append(value)
    return tuple(values)


integer_list.__name__ = "integer list"
POSITIVE_NUMBER = number_in(0.0, low_open=True)
PROBABILITY = number_in(0.0, 1.0, high_open=True)  # dropout: 1 would drop everything
GUIDANCE_SCALE = number_in(0.0, 50.0)  # the API's bounds (service/api/schemas.py)


def colour(text: str) -> str:
    """An argparse ``type``: a colour Pillow names ("white", "#808080", "rgb(0, 0, 0)"), as typed."""
    if not is_colour(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a colour (a name such as white, or #rrggbb)")
    return text
