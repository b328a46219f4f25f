"""The reverse process p_theta(x_{t-1} | x_t): Algorithm 2 of Ho et al. 2020, and the faster samplers.

The per-step update is one function of per-sample coefficients (``kernels.reverse_step``), so samples
at different timesteps, in different respaced chains and under different samplers share a call. The
coefficients come from ``ddpm.samplers`` (the papers' equations); a ``ChainSpec`` names a chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddpm.respace import respace_steps
from ddpm.samplers import Sampler, coefficient_table
from ddpm.schedule import NoiseSchedule, VarianceType
from kernels.reverse_step import StepCoefficients, reverse_step

__all__ = ["ChainSpec", "ChainTables", "StepCoefficients", "predict_x0", "reverse_step", "sample", "sample_chain"]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) -> eps


@dataclass(frozen=True)
class ChainSpec:
    """Everything that decides a chain's per-step coefficients, besides the model's schedule and variance."""

    steps: int
    sampler: str = "ddpm"
    eta: float = 0.0  # ddim only
    clip: bool = True  # clip x0_hat to [-1, 1]
    spacing: str = "linspace"  # ddpm.respace.SPACINGS
    steps_offset: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", Sampler(self.sampler).value)
        object.__setattr__(self, "eta", float(self.eta))

    @property
    def multistep(self) -> bool:
        return Sampler(self.sampler).multistep


class ChainTables:
    """Float32 tables of one chain, indexed by chain position i = 0..S-1 (position i steps from tau_i)."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        variance_type: VarianceType,
        device: torch.device | str = "cpu",
        *,
        sampler: Sampler | str = Sampler.DDPM,
        eta: float = 0.0,
        clip: bool = True,
    ) -> None:
        self.schedule = schedule
        self.sampler = Sampler(sampler)
        self.multistep = self.sampler.multistep
        self.num_steps = schedule.num_timesteps
        table = coefficient_table(schedule, self.sampler, variance_type=variance_type, eta=eta, clip=clip)  # (8, S) float64
        self.table64 = table
        self.table = torch.from_numpy(table).to(device=device, dtype=torch.float32)
        self.timesteps = torch.from_numpy(np.array(schedule.timesteps)).to(device)  # original t of each position

    @classmethod
    def for_spec(
        cls, schedule: NoiseSchedule, variance_type: VarianceType, spec: ChainSpec, device: torch.device | str = "cpu"
    ) -> ChainTables:
        chain = respace_steps(schedule, spec.steps, spec.spacing, spec.steps_offset)
        return cls(chain, variance_type, device, sampler=spec.sampler, eta=spec.eta, clip=spec.clip)

    def coefficients(self, positions: torch.Tensor) -> StepCoefficients:
        return StepCoefficients.from_stacked(self.table[:, positions])  # (8, B)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients) -> torch.Tensor:
    """Eq. 15 solved for x_0: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    b = (-1, 1, 1, 1)
    return coefs.x0_from_x.view(b) * x_t - coefs.x0_from_eps.view(b) * eps


StepFn = Callable[..., torch.Tensor]


def default_step_fn() -> StepFn:
    """The fused step dispatcher of ``kernels`` (Triton on CUDA, the PyTorch twin on CPU)."""
    from kernels.reverse_step import fused_reverse_step

    return fused_reverse_step


@dataclass
class SampleProgress:
    step: int  # 1..S, steps done
    total: int
    x: torch.Tensor


def sample_chain(
    model: EpsModel,
    schedule: NoiseSchedule,
    seeds: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    steps: int | None = None,
    variance_type: VarianceType = VarianceType.FIXED_SMALL,
    clip_denoised: bool = True,
    sampler: Sampler | str = Sampler.DDPM,
    eta: float = 0.0,
    spacing: str = "linspace",
    steps_offset: int = 0,
    device: torch.device | str = "cpu",
    step_fn: StepFn | None = None,
) -> Iterator[SampleProgress]:
    """Algorithm 2 (or DDIM, or DPM-Solver++(2M)) for a batch of images, one Philox seed each (int64
    bits); yields after every step.

    x_T ~ N(0, I) and every z are drawn from the image's own seed (counter 0 for x_T, the paper's t for z),
    so image i depends on seeds[i] alone. The last yield holds x_0 (in [-1, 1] if clip_denoised).
    """
    from kernels.philox import sample_noise

    step_fn = step_fn or default_step_fn()
    spec = ChainSpec(steps or schedule.num_timesteps, sampler, eta, clip_denoised, spacing, steps_offset)
    tables = ChainTables.for_spec(schedule, variance_type, spec, device)
    seeds = seeds.to(device)
    b = seeds.shape[0]
    x = sample_noise(seeds, 0, shape)  # x_T, (B, C, H, W)
    x0_prev = torch.zeros(x.shape, dtype=torch.float32, device=device) if tables.multistep else None
    for i in reversed(range(tables.num_steps)):
        positions = torch.full((b,), i, dtype=torch.long, device=device)
        t = tables.timesteps[positions]  # original timesteps, (B,)
        eps = model(x, t)
        x, x0 = step_fn(x, eps, tables.coefficients(positions), seeds, t + 1, x0_prev)
        x0_prev = x0 if tables.multistep else None
        yield SampleProgress(step=tables.num_steps - i, total=tables.num_steps, x=x)


def sample(model: EpsModel, schedule: NoiseSchedule, seeds: torch.Tensor, shape: tuple[int, int, int], **kwargs: object) -> torch.Tensor:
    """Run the whole chain; returns x_0 of shape (B, C, H, W)."""
    x = None
    for progress in sample_chain(model, schedule, seeds, shape, **kwargs):  # type: ignore[arg-type]
        x = progress.x
    assert x is not None
    return x
