"""Noise schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Everything is computed in float64 (the cumulative products lose digits in float32 near t = T)
and handed out in float32 by :meth:`NoiseSchedule.tensor`. Index t runs 0..T-1 in code; the
paper's t = 1..T is code index t - 1.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
import torch


class BetaSchedule(str, enum.Enum):
    LINEAR = "linear"  # Ho et al. 2020, Sec. 4: beta_1 = 1e-4 .. beta_T = 0.02
    COSINE = "cosine"  # Nichol & Dhariwal 2021, Eq. 17


class VarianceType(str, enum.Enum):
    """The two fixed reverse-process variances of Ho et al. 2020, Sec. 3.2."""

    FIXED_LARGE = "fixed_large"  # sigma_t^2 = beta_t
    FIXED_SMALL = "fixed_small"  # sigma_t^2 = beta_tilde_t (Eq. 7)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear betas from beta_start to beta_end (``make_schedule`` scales the paper's endpoints for T != 1000)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2."""

    def f(t: float) -> float:
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    # beta_t = 1 - abar_t / abar_{t-1}, clipped to max_beta to avoid the singularity at t = T.
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """An immutable schedule: betas and every quantity derived from them (float64 numpy arrays).

    Build one with :meth:`from_betas` or :func:`make_schedule`; a respaced chain is built the same
    way from recomputed betas (see ``ddpm.respace``).
    """

    betas: np.ndarray
    kind: str = "custom"
    params: dict[str, float] = field(default_factory=dict)
    # The original timestep each index stands for (identity unless respaced).
    timesteps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    alphas: np.ndarray = field(init=False)
    alphas_cumprod: np.ndarray = field(init=False)
    alphas_cumprod_prev: np.ndarray = field(init=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False)
    posterior_variance: np.ndarray = field(init=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False)
    posterior_mean_coef1: np.ndarray = field(init=False)
    posterior_mean_coef2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1]; these span {betas.min():g} .. {betas.max():g}")
        timesteps = np.asarray(self.timesteps, dtype=np.int64)
        if len(timesteps) == 0:
            timesteps = np.arange(len(betas), dtype=np.int64)
        if len(timesteps) != len(betas):
            raise ValueError("timesteps and betas must have the same length")

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)  # abar_t = prod_{s<=t} alpha_s (Eq. 4 notation)
        abar_prev = np.append(1.0, abar[:-1])
        # Eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta_tilde_1 = 0; its log is clipped to that of beta_tilde_2 (as in improved-diffusion).
        log_var = np.log(np.append(posterior_variance[1], posterior_variance[1:])) if len(betas) > 1 else np.log(betas)
        derived = {
            "betas": betas,
            "timesteps": timesteps,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": log_var,
            # Eq. 7: mu_tilde_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        for name, value in derived.items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_betas(cls, betas: np.ndarray, *, kind: str = "custom", params: dict[str, float] | None = None) -> NoiseSchedule:
        return cls(betas=np.asarray(betas, dtype=np.float64), kind=kind, params=dict(params or {}))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def variance(self, variance_type: VarianceType) -> np.ndarray:
        """sigma_t^2 of the reverse process p(x_{t-1} | x_t) (Sec. 3.2)."""
        if VarianceType(variance_type) is VarianceType.FIXED_LARGE:
            return self.betas
        return self.posterior_variance

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One array of the schedule as a float32 tensor."""
        return torch.from_numpy(np.array(getattr(self, name))).to(device=device, dtype=torch.float32)

    def to_dict(self) -> dict[str, object]:
        """Metadata and the main arrays, JSON-ready (float32 values as Python floats)."""
        arrays = [
            "betas",
            "alphas_cumprod",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "posterior_variance",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
        ]
        out: dict[str, object] = {"num_timesteps": self.num_timesteps, "kind": self.kind, "params": dict(self.params)}
        for name in arrays:
            out[name] = getattr(self, name).astype(np.float32).tolist()
        return out


def linear_endpoints(num_timesteps: int) -> dict[str, float]:
    """Ho et al.'s beta_1 = 1e-4, beta_T = 0.02 are for T = 1000; for another T both scale by 1000/T
    (improved-diffusion's ``get_named_beta_schedule``), so the chain still ends near pure noise
    (abar_T ~ 4e-5 at any T; unscaled, T = 100 would leave abar_T = 0.36)."""
    scale = 1000 / num_timesteps
    if 0.02 * scale >= 1:
        raise ValueError(f"the linear schedule needs T > 20 (at T = {num_timesteps} the scaled beta_T = {0.02 * scale:g} >= 1); use cosine")
    return {"beta_start": 1e-4 * scale, "beta_end": 0.02 * scale}


MAX_TIMESTEPS = 100_000  # T: the paper's is 1000, improved DDPM's 4000; a T of 10^9 from a model file took every byte
# of memory (the schedule's float64 arrays) before anything said why
PARAMS = {BetaSchedule.LINEAR: ("beta_start", "beta_end"), BetaSchedule.COSINE: ("s", "max_beta")}


def make_schedule(kind: BetaSchedule | str = BetaSchedule.LINEAR, num_timesteps: int = 1000, **params: float) -> NoiseSchedule:
    """The named schedule with the paper's (or Nichol & Dhariwal's) default parameters; ValueError naming what is wrong
    with a kind, T or parameter (they come from model files)."""
    if kind not in tuple(k.value for k in BetaSchedule):  # (a str enum's member equals its value but does not hash as it)
        raise ValueError(f"schedule kind {kind!r} is not one of {', '.join(k.value for k in BetaSchedule)}")
    kind = BetaSchedule(kind)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"num_timesteps must be an integer in 1..{MAX_TIMESTEPS}, got {num_timesteps!r}")
    for name, value in params.items():
        if name not in PARAMS[kind]:
            raise ValueError(f"the {kind.value} schedule takes {' and '.join(PARAMS[kind])}, not {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"schedule parameter {name} must be a finite number, got {value!r}")
    if kind is BetaSchedule.LINEAR:
        full = {**(linear_endpoints(num_timesteps) if not {"beta_start", "beta_end"} <= params.keys() else {}), **params}
        betas = linear_betas(num_timesteps, full["beta_start"], full["beta_end"])
    else:
        full = {"s": 0.008, "max_beta": 0.999, **params}
        betas = cosine_betas(num_timesteps, full["s"], full["max_beta"])
    return NoiseSchedule.from_betas(betas, kind=kind.value, params=full)
