"""The reverse process p_theta(x_{t-1} | x_t): Algorithm 2 of Ho et al. 2020, and the faster samplers.

The per-step update is one function of per-sample coefficients (``kernels.reverse_step``), so samples
at different timesteps, in different respaced chains and under different samplers share a call. The
coefficients come from ``ddpm.samplers`` (the papers' equations); a ``ChainSpec`` names a chain. The
chain runs in ``ddpm.denoising_iteration`` (served and offline: ``ddpm.offline_sampler``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ddpm.editing import DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_N_SAMPLE, edit_table, repaint_calls, sdedit_start
from ddpm.respace import respace, respace_steps, spaced_timesteps
from ddpm.samplers import Sampler, inpainting_samplers, sampler_rule
from ddpm.schedule import NoiseSchedule, VarianceType
from kernels.reverse_step import StepCoefficients, reverse_step

__all__ = ["ChainSpec", "ChainTables", "StepCoefficients", "predict_x0", "reverse_step"]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) -> eps


@dataclass(frozen=True)
class ChainSpec:
    """Everything that decides a chain's per-step coefficients, besides the model's schedule and variance.

    Editing (``ddpm.editing``): ``strength`` < 1 starts the chain from the input image noised to the level
    of round(strength T) - 1 (SDEdit); ``repaint`` blends a known region in at every step and resamples
    (RePaint: ``jump_length``, ``jump_n_sample``; 1 sample: no resampling)."""

    steps: int
    sampler: str = "ddpm"
    eta: float = 0.0  # ddim only
    clip: bool = True  # clip x0_hat to [-1, 1]
    spacing: str = "linspace"  # ddpm.respace.SPACINGS
    steps_offset: int = 0
    strength: float = 1.0  # SDEdit: the share of the chain run from the noised input (1: from pure noise)
    repaint: bool = False  # RePaint: a mask keeps the input's known pixels
    jump_length: int = DEFAULT_JUMP_LENGTH  # RePaint's j (positions jumped back up)
    jump_n_sample: int = DEFAULT_JUMP_N_SAMPLE  # RePaint's r (times each jump point is sampled; 1: no resampling)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", Sampler(self.sampler).value)
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "strength", float(self.strength))
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not self.repaint:  # one spelling of "no resampling": the defaults
            object.__setattr__(self, "jump_length", DEFAULT_JUMP_LENGTH)
            object.__setattr__(self, "jump_n_sample", DEFAULT_JUMP_N_SAMPLE)
        elif self.multistep:
            raise ValueError(f"inpainting runs with sampler {' or '.join(inpainting_samplers())} (a jump back up breaks "
                             f"{self.sampler}'s multistep history)")  # fmt: skip
        elif self.jump_length < 1 or self.jump_n_sample < 1:
            raise ValueError("jump_length and jump_n_sample must be >= 1")

    @functools.cached_property
    def multistep(self) -> bool:
        return sampler_rule(self.sampler).multistep

    @property
    def edits(self) -> bool:
        """Whether the chain starts from or keeps part of an input image."""
        return self.strength < 1.0 or self.repaint

    @functools.cached_property
    def unet_calls(self) -> int:
        """U-Net calls per image: the steps, plus RePaint's resampling (counted once per spec: progress
        reads it every iteration)."""
        return len(repaint_calls(self.steps, self.jump_length, self.jump_n_sample)) if self.repaint else self.steps


class ChainTables:
    """Float32 tables of one chain, indexed by iteration i = 0..K-1, run from K-1 down (a plain chain:
    K = S and i is the chain position, stepping from tau_i; a RePaint chain: one column per U-Net call).

    ``counters``: the Philox counter of each iteration's noise: the paper's t + 1 (x_T takes 0); a RePaint
    chain visits timesteps more than once, so its calls count on from T + 1 instead."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        variance_type: VarianceType,
        device: torch.device | str = "cpu",
        *,
        sampler: Sampler | str = Sampler.DDPM,
        eta: float = 0.0,
        clip: bool = True,
        calls: list[tuple[int, int]] | None = None,
        counter_base: int = 0,
    ) -> None:
        self.schedule = schedule
        self.sampler = Sampler(sampler)
        rule = sampler_rule(sampler)
        self.multistep = rule.multistep
        timesteps = np.array(schedule.timesteps)  # original t of each position
        abar_start = float(schedule.alphas_cumprod[-1])  # the level the chain starts from
        self.edit_table64: np.ndarray | None = None
        if calls is None:  # a column per position (a sampler with its own call plan refuses: ChainTables.for_spec)
            table = rule.table(schedule, variance_type=variance_type, eta=eta, clip=clip)  # (8, S) float64
            counters = timesteps + 1
        else:  # a column per call, RePaint's plan or the sampler's own (and jumps back up), the last-run first
            table = rule.call_table(schedule, calls, variance_type=variance_type, eta=eta, clip=clip)
            order = [position for position, _ in reversed(calls)]
            table, timesteps = table[:, ::-1].copy(), timesteps[order]
            self.edit_table64 = edit_table(schedule, calls)[:, ::-1].copy()
            counters = counter_base + 1 + np.arange(len(calls))
        self.num_steps = table.shape[1]
        self.table64 = table
        self.table = torch.from_numpy(table).to(device=device, dtype=torch.float32)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.counters = torch.from_numpy(np.asarray(counters, dtype=np.int64)).to(device)
        self.edit_table = None if self.edit_table64 is None else torch.from_numpy(self.edit_table64).to(device=device, dtype=torch.float32)
        # SDEdit's start, x = start_x x_in + start_z z (Eq. 4 at the chain's first timestep)
        self.start_x, self.start_z = float(np.sqrt(abar_start)), float(np.sqrt(1.0 - abar_start))

    @classmethod
    def for_spec(
        cls, schedule: NoiseSchedule, variance_type: VarianceType, spec: ChainSpec, device: torch.device | str = "cpu"
    ) -> ChainTables:
        span = sdedit_start(schedule.num_timesteps, spec.strength)  # T at strength 1: the whole chain
        rule = sampler_rule(spec.sampler)
        positions = rule.positions(spec.steps)
        if span == schedule.num_timesteps:
            chain = respace_steps(schedule, positions, spec.spacing, spec.steps_offset)
        else:  # SDEdit: the positions spaced over 0..t0
            chain = respace(schedule, spaced_timesteps(span, positions, spec.spacing, spec.steps_offset))
        calls = repaint_calls(spec.steps, spec.jump_length, spec.jump_n_sample) if spec.repaint else rule.calls(spec.steps)
        return cls(chain, variance_type, device, sampler=spec.sampler, eta=spec.eta, clip=spec.clip, calls=calls,
                   counter_base=schedule.num_timesteps)  # fmt: skip

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
