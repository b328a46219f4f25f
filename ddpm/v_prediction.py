"""A U-Net that predicts v instead of eps (Salimans & Ho, ICLR 2022, Sec. 4 and App. D), as an eps_theta.

With alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), x_t = alpha_t x_0 + sigma_t eps (Eq. 4 of Ho
et al.) and v = alpha_t eps - sigma_t x_0, so

    x_0 = alpha_t x_t - sigma_t v,        eps = sigma_t x_t + alpha_t v.

v stays well defined where eps-prediction is not: at t = T (alpha_T ~ 0.006 here) eps carries no
information about x_0, and a distilled student's few steps start there (``ddpm.distill``). The server
and the samplers take eps (the fused step's tables read x_0 from it by Eq. 15), so :class:`EpsFromV`
converts: the chain then runs unchanged.
"""

from __future__ import annotations

import torch

from ddpm.schedule import NoiseSchedule


def _per_sample(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return table[t].view(-1, 1, 1, 1)


class EpsFromV(torch.nn.Module):
    """eps_theta(x_t, t) = sigma_t x_t + alpha_t v_theta(x_t, t), the wrapped U-Net predicting v."""

    def __init__(self, unet: torch.nn.Module, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("alpha", schedule.tensor("sqrt_alphas_cumprod", "cpu"), persistent=False)
        self.register_buffer("sigma", schedule.tensor("sqrt_one_minus_alphas_cumprod", "cpu"), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        v = self.unet(x, t, *labels)
        return (_per_sample(self.sigma, t) * x + _per_sample(self.alpha, t) * v.float()).to(v.dtype)


def x0_from_v(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_0 = alpha_t x_t - sigma_t v (alpha, sigma broadcast per sample)."""
    return alpha * x - sigma * v


def eps_from_v(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = sigma_t x_t + alpha_t v."""
    return sigma * x + alpha * v
