"""The reverse process p_theta(x_{t-1} | x_t) and Algorithm 2 of Ho et al. 2020.

The per-step update is one function of per-sample coefficients, so samples at different timesteps
(and in different respaced chains) can share a call: ``reverse_step(x_t, eps, coefs, noise)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddpm.respace import respace_steps
from ddpm.schedule import NoiseSchedule, VarianceType

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) -> eps


@dataclass(frozen=True)
class StepCoefficients:
    """Per-sample coefficients of one reverse step, each a float32 tensor of shape (B,)."""

    recip_sqrt_alpha: torch.Tensor  # 1 / sqrt(alpha_t)
    eps_coef: torch.Tensor  # beta_t / sqrt(1 - abar_t)
    sigma: torch.Tensor  # sigma_t, 0 at the chain's last step (t = 1)
    sqrt_recip_abar: torch.Tensor  # 1 / sqrt(abar_t), for x0 = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)
    sqrt_recipm1_abar: torch.Tensor  # sqrt(1/abar_t - 1)
    post_coef1: torch.Tensor  # posterior mean coefficient of x0 (Eq. 7)
    post_coef2: torch.Tensor  # posterior mean coefficient of x_t (Eq. 7)

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(StepCoefficients.__dataclass_fields__)

    def stacked(self) -> torch.Tensor:
        """All coefficients as one (7, B) tensor, in field order."""
        return torch.stack([getattr(self, n) for n in self.names()])

    @staticmethod
    def cat(parts: list[StepCoefficients]) -> StepCoefficients:
        return StepCoefficients(**{n: torch.cat([getattr(p, n) for p in parts]) for n in StepCoefficients.names()})


class ChainTables:
    """Float32 tables of one (possibly respaced) chain, indexed by chain position i = 0..S-1."""

    def __init__(self, schedule: NoiseSchedule, variance_type: VarianceType, device: torch.device | str = "cpu") -> None:
        self.schedule = schedule
        self.num_steps = schedule.num_timesteps
        sigma = np.sqrt(schedule.variance(variance_type))
        sigma = np.append(0.0, sigma[1:])  # Algorithm 2: z = 0 at the last step (t = 1)
        table = np.stack(
            [
                1.0 / np.sqrt(schedule.alphas),
                schedule.betas / schedule.sqrt_one_minus_alphas_cumprod,
                sigma,
                schedule.sqrt_recip_alphas_cumprod,
                schedule.sqrt_recipm1_alphas_cumprod,
                schedule.posterior_mean_coef1,
                schedule.posterior_mean_coef2,
            ]
        )  # (7, S), float64 until here
        self.table = torch.from_numpy(table).to(device=device, dtype=torch.float32)
        self.timesteps = torch.from_numpy(np.array(schedule.timesteps)).to(device)  # original t of each position

    def coefficients(self, positions: torch.Tensor) -> StepCoefficients:
        cols = self.table[:, positions]  # (7, B)
        return StepCoefficients(*cols.unbind(0))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients) -> torch.Tensor:
    """Eq. 15 inverted: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return _b(coefs.sqrt_recip_abar) * x_t - _b(coefs.sqrt_recipm1_abar) * eps


def _b(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]  # (B,) -> (B, 1, 1, 1)


def reverse_step(
    x_t: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients, noise: torch.Tensor, clip_denoised: bool = False
) -> torch.Tensor:
    """One step of Algorithm 2 (line 4), in float32, returned in x_t's dtype.

    Without clipping: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) + sigma_t z  (Eq. 11).
    With clipping: x0 from eps, clipped to [-1, 1], then the posterior mean of Eq. 7 plus sigma_t z.
    """
    x, e, z = x_t.float(), eps.float(), noise.float()
    if clip_denoised:
        x0 = predict_x0(x, e, coefs).clamp(-1.0, 1.0)
        mean = _b(coefs.post_coef1) * x0 + _b(coefs.post_coef2) * x
    else:
        mean = _b(coefs.recip_sqrt_alpha) * (x - _b(coefs.eps_coef) * e)
    return (mean + _b(coefs.sigma) * z).to(x_t.dtype)


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
    device: torch.device | str = "cpu",
    step_fn: StepFn | None = None,
) -> Iterator[SampleProgress]:
    """Algorithm 2 for a batch of images, one Philox seed each (int64 bits); yields after every step.

    x_T ~ N(0, I) and every z are drawn from the image's own seed (counter 0 for x_T, the paper's t for z),
    so image i depends on seeds[i] alone. The last yield holds x_0 in [-1, 1] (clipped if clip_denoised).
    """
    from kernels.philox import sample_noise

    step_fn = step_fn or default_step_fn()
    chain = respace_steps(schedule, steps or schedule.num_timesteps)
    tables = ChainTables(chain, variance_type, device)
    seeds = seeds.to(device)
    b = seeds.shape[0]
    x = sample_noise(seeds, 0, shape)  # x_T, (B, C, H, W)
    for i in reversed(range(tables.num_steps)):
        positions = torch.full((b,), i, dtype=torch.long, device=device)
        t = tables.timesteps[positions]  # original timesteps, (B,)
        eps = model(x, t)
        x = step_fn(x, eps, tables.coefficients(positions), seeds, t + 1, clip_denoised)
        yield SampleProgress(step=tables.num_steps - i, total=tables.num_steps, x=x)


def sample(model: EpsModel, schedule: NoiseSchedule, seeds: torch.Tensor, shape: tuple[int, int, int], **kwargs: object) -> torch.Tensor:
    """Run the whole chain; returns x_0 of shape (B, C, H, W)."""
    x = None
    for progress in sample_chain(model, schedule, seeds, shape, **kwargs):  # type: ignore[arg-type]
        x = progress.x
    assert x is not None
    return x
