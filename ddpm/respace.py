"""Respaced chains (Nichol & Dhariwal 2021, Sec. 4): sample with S < T steps over a subsequence.

For a kept subsequence tau_1 < ... < tau_S of the original timesteps, the new betas are
beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}, so that the respaced chain has exactly the same
marginals abar at its timesteps. With S = T the original betas come back unchanged.
"""

from __future__ import annotations

import numpy as np

from ddpm.schedule import NoiseSchedule


def spaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """S evenly spaced original timesteps, always including the last one (T-1) so x_T is pure noise."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    # A stride >= 1 keeps the rounded values strictly increasing.
    return np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)


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


def respace_steps(schedule: NoiseSchedule, steps: int) -> NoiseSchedule:
    """The S-step chain that the API's ``steps`` means; S = T gives the paper's chain."""
    if steps == schedule.num_timesteps:
        return schedule
    return respace(schedule, spaced_timesteps(schedule.num_timesteps, steps))
