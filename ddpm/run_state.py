"""A resumable run's ``state.pt`` (``ddpm train``, ``ddpm distill``), read with an error that says what to do:
a damaged file (a copy cut short, a full disk outside this project's atomic saves) was torch's zip-reader
traceback."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def load_run_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The saved state, or ValueError naming the file, why it cannot be read, and the way out."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)  # the run's own file: optimiser state, RNG
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        why = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__  # torch's first sentence
        raise ValueError(f"{path} cannot be read ({why}): restore it, or move it away to start the run over") from exc
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{path} is not a run's saved state: move it away to start the run over")
    return state
