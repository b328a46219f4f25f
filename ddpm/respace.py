"""Respaced chains (Nichol & Dhariwal 2021, Sec. 4): sample with S < T steps over a subsequence.

For a kept subsequence tau_1 < ... < tau_S of the original timesteps, the new betas are
beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} (abar_{tau_0} = 1: the last step lands on clean data),
so that the respaced chain has exactly the same marginals abar at its timesteps. With S = T the
original betas come back unchanged.

Which subsequence: the three spacings of diffusers' schedulers (Lin et al. 2024, Table 2):
``linspace`` (ours, diffusers' DDPM/DDIM ``linspace``: round(linspace(0, T-1, S)), both ends kept),
``leading`` (diffusers' default: k * (T // S) + steps_offset) and ``trailing`` (round(T - k T/S) - 1:
starts at T-1 and never visits t = 0, so no model call is spent on the nearly clean step).
"""

from __future__ import annotations

import numpy as np

from ddpm.names import DEFAULT_SPACING, SPACINGS
from ddpm.schedule import NoiseSchedule

__all__ = ["DEFAULT_SPACING", "SPACINGS", "respace", "respace_steps", "spaced_timesteps"]


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """S original timesteps in increasing order, spaced as ``spacing`` says."""
    t = num_timesteps
    if not 1 <= steps <= t:
        raise ValueError(f"steps must be in 1..{t}, got {steps}")
    if spacing == "linspace":
        if steps == 1:
            return np.array([t - 1], dtype=np.int64)  # x_T is pure noise
        out = np.round(np.linspace(0, t - 1, steps))  # a stride >= 1 keeps the rounded values increasing
    elif spacing == "leading":
        out = np.arange(steps) * (t // steps) + steps_offset
    elif spacing == "trailing":
        out = np.round(t - np.arange(steps) * (t / steps))[::-1] - 1  # computed per k: no float-arange overrun
    else:
        raise ValueError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    out = out.astype(np.int64)
    if out[0] < 0 or out[-1] >= t:
        raise ValueError(f"{spacing} spacing with steps_offset {steps_offset} leaves 0..{t - 1} at {steps} steps")
    return out


def respace(schedule: NoiseSchedule, timesteps: np.ndarray) -> NoiseSchedule:
    """The schedule restricted to ``timesteps`` (increasing original indices), betas recomputed."""
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if len(timesteps) == 0 or (np.diff(timesteps) <= 0).any():
        raise ValueError("timesteps must be non-empty and strictly increasing")
    if timesteps[0] < 0 or timesteps[-1] >= schedule.num_timesteps:
        raise ValueError("timesteps out of range")
    abar = schedule.alphas_cumprod[timesteps]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1.0 - abar / abar_prev
    return NoiseSchedule(betas=betas, kind=schedule.kind, params=dict(schedule.params), timesteps=schedule.timesteps[timesteps])


def respace_steps(schedule: NoiseSchedule, steps: int, spacing: str = "linspace", steps_offset: int = 0) -> NoiseSchedule:
    """The S-step chain that the API's ``steps`` means; S = T (without an offset) is the paper's chain."""
    timesteps = spaced_timesteps(schedule.num_timesteps, steps, spacing, steps_offset)
    if steps == schedule.num_timesteps and (timesteps == np.arange(steps)).all():
        return schedule
    return respace(schedule, timesteps)
