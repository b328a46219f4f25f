"""The ``ddpm`` command as the user typed it, quoted for a shell: recorded in a run's lock, a model card, a report."""

from __future__ import annotations

import shlex
import sys


def typed_command() -> str:
    return "ddpm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
