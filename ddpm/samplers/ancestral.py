"""``ddpm``: Algorithm 2 of Ho et al. 2020, ancestral sampling (Eq. 11, or the posterior mean of Eq. 7
when x0 is clipped), over the full chain or a respaced one."""

from __future__ import annotations

import numpy as np

from ddpm.names import Sampler
from ddpm.samplers.base import SamplerRule, step_table
from ddpm.schedule import NoiseSchedule, VarianceType


def ddpm_table(chain: NoiseSchedule, variance_type: VarianceType, clip: bool) -> np.ndarray:
    """Algorithm 2, line 4, at every position of the chain."""
    sigma = np.sqrt(chain.variance(variance_type))
    sigma = np.append(0.0, sigma[1:])  # z = 0 at the last step (t = 1)
    if clip:  # Eq. 7: mu_tilde = coef1 x0 + coef2 x_t, with x0 clipped
        return step_table(chain, True, x=chain.posterior_mean_coef2, x0=chain.posterior_mean_coef1, sigma=sigma)
    # Eq. 11: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z
    recip_sqrt_alpha = 1.0 / np.sqrt(chain.alphas)
    eps = -recip_sqrt_alpha * chain.betas / chain.sqrt_one_minus_alphas_cumprod
    return step_table(chain, False, x=recip_sqrt_alpha, eps=eps, sigma=sigma)


class Ancestral(SamplerRule):
    name = Sampler.DDPM.value
    full_chain_by_default = True  # Algorithm 2 named alone: the paper's T steps

    def table(self, chain: NoiseSchedule, *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        return ddpm_table(chain, VarianceType(variance_type), clip)
