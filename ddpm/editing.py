"""Editing an image with a trained DDPM, no new training: two chains of the one fused step.

SDEdit (Meng et al., ICLR 2022, Sec. 3.2): noise the input x_in to the level of an intermediate
timestep t0 by the forward process (Ho et al. Eq. 4),

    x_{t0} = sqrt(abar_{t0}) x_in + sqrt(1 - abar_{t0}) z,        t0 = round(strength T) - 1,

then run the request's sampler from t0 down. The request's ``steps`` count the U-Net calls actually
run: the S timesteps are spaced over 0..t0 as the spacing spaces them over 0..T-1 (diffusers'
image-to-image runs int(steps * strength) of a T-spaced chain instead; same idea, other count).

RePaint (Lugmayr et al., CVPR 2022, Alg. 1): at every step the known region (mask m = 1) is replaced
by the input noised to the step's level (Eq. 8a), the rest is the model's step (Eq. 8b), blended (Eq. 8c):

    x_{t-1} = m (sqrt(abar_{t-1}) x_in + sqrt(1 - abar_{t-1}) z) + (1 - m) x_{t-1}^model,

with resampling: after certain steps the sample jumps back up j steps by the forward process,
q(x_{t+j-1} | x_{t-1}) = N(sqrt(abar_{t+j-1} / abar_{t-1}) x_{t-1}, (1 - abar_{t+j-1} / abar_{t-1}) I)
(Alg. 1 line 10, composed over the j steps: a product of Gaussian transitions is one Gaussian), and
descends again, ``jump_n_sample`` times per jump point; the schedule of calls is diffusers'
``RePaintScheduler.set_timesteps``. The jump composes with the step before it into one affine map
plus one Gaussian (``kernels.reverse_step.EditTerms``): one U-Net call, one launch per iteration.

Over a respaced chain (tau_i) the jump goes from the level of tau_{p-1} to that of tau_{p-1+j}
exactly; diffusers multiplies the betas of t .. t + j (T/S) - 1 instead, which is the same when
S = T (the parity test's case) and off by T/S - 1 timesteps otherwise.
"""

from __future__ import annotations

import numpy as np

from ddpm.schedule import NoiseSchedule
from kernels.reverse_step import EditTerms

EDIT_ROWS = EditTerms.CHAIN_ROWS  # the rows of an edit table, by name: known_x, known_z, jump_x, jump_z
EDIT_ROW = {name: row for row, name in enumerate(EDIT_ROWS)}
# RePaint's resampling by default: every 5 steps, once more (BENCHMARKS.md, editing: on the shipped model at 50
# steps, FD of the completions 22-39 against 31-59 without resampling, the class kept 0.41-0.76 against
# 0.33-0.69, for about 1.9x the U-Net calls; the paper's own is j = r = 10)
DEFAULT_JUMP_LENGTH = 5
# a variation's strength by default: the largest measured that keeps the input's digit in >= 80% of
# variations (BENCHMARKS.md, editing: 0.3 keeps 0.92, 0.4 keeps 0.805 with diversity 13.1, 0.5 keeps
# 0.545, 0.75 keeps 0.135: the linear schedule leaves little signal past the middle of the chain;
# diffusers' image-to-image default, 0.8, is for latent models on another schedule)
DEFAULT_VARIATION_STRENGTH = 0.4
DEFAULT_JUMP_N_SAMPLE = 2  # kernels.reverse_step.EditTerms, less the per-row mask flag


def sdedit_start(num_timesteps: int, strength: float) -> int:
    """The number of original timesteps the SDEdit chain spans, t0 + 1 = round(strength T) (>= 1)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(1, round(strength * num_timesteps))


def edit_options(
    strength: float | None = None, repaint: bool = False, jump_length: int | None = None, jump_n_sample: int | None = None
) -> dict[str, object]:
    """An edit's chain options (``LoadedModel.chain``'s keywords) from what a request or command gave:
    a variation runs the last DEFAULT_VARIATION_STRENGTH of the chain by default, an inpainting all of it."""
    strength = strength if strength is not None else (1.0 if repaint else DEFAULT_VARIATION_STRENGTH)
    return {"strength": strength, "repaint": repaint, "jump_length": jump_length, "jump_n_sample": jump_n_sample}


def repaint_calls(num_steps: int, jump_length: int, jump_n_sample: int) -> list[tuple[int, int]]:
    """RePaint's schedule over a chain of ``num_steps`` positions (diffusers' ``set_timesteps``): the
    U-Net calls in order, each as (chain position, positions jumped back up right after it; 0: none)."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    calls: list[tuple[int, int]] = []
    t = num_steps
    while t >= 1:
        t -= 1
        calls.append((t, 0))
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            calls[-1] = (t, jump_length)
            t += jump_length
    return calls


def edit_table(chain: NoiseSchedule, calls: list[tuple[int, int]]) -> np.ndarray:
    """(4, K) float64 rows ``EDIT_ROWS`` for the K calls (call k = column k, in the order they run):
    the known region's level after the step (Eq. 8a) and the composed jump q(x_up | x_prev)."""
    abar = np.asarray(chain.alphas_cumprod, dtype=np.float64)
    level = np.append(1.0, abar)  # level[p] = abar of tau_{p-1}, the level after stepping from position p (1: clean)
    positions = np.array([p for p, _ in calls], dtype=np.int64)
    up = positions + np.array([jump for _, jump in calls], dtype=np.int64)
    ratio = level[up] / level[positions]  # abar_{tau_{p-1+j}} / abar_{tau_{p-1}} (1: no jump)
    terms = {
        "known_x": np.sqrt(level[positions]),
        "known_z": np.sqrt(1.0 - level[positions]),
        "jump_x": np.sqrt(ratio),
        "jump_z": np.sqrt(np.maximum(1.0 - ratio, 0.0)),
    }
    return np.stack([terms[name] for name in EDIT_ROWS])
