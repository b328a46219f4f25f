"""``ddim``: Song, Meng & Ermon 2021, Eq. 12 with sigma from Eq. 16 scaled by eta (eta = 0: deterministic,
eta = 1: the DDPM posterior variance); as diffusers' DDIMScheduler (``use_clipped_model_output=False``),
the direction term uses the model's eps even when x0_hat is clipped."""

from __future__ import annotations

import numpy as np

from ddpm.names import Sampler
from ddpm.samplers.base import SamplerRule, step_table
from ddpm.schedule import NoiseSchedule, VarianceType


def ddim_sigma(chain: NoiseSchedule, eta: float) -> np.ndarray:
    """DDIM Eq. 16: sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)."""
    abar, abar_prev = chain.alphas_cumprod, chain.alphas_cumprod_prev
    return eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))


def ddim_table(chain: NoiseSchedule, eta: float, clip: bool) -> np.ndarray:
    """DDIM Eq. 12: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    abar_prev = chain.alphas_cumprod_prev
    sigma = ddim_sigma(chain, eta)
    direction = np.sqrt(np.clip(1.0 - abar_prev - sigma**2, 0.0, None))  # >= 0 up to float64 rounding
    return step_table(chain, clip, x0=np.sqrt(abar_prev), eps=direction, sigma=sigma)


class DDIM(SamplerRule):
    name = Sampler.DDIM.value
    takes_eta = True

    def table(self, chain: NoiseSchedule, *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        return ddim_table(chain, eta, clip)
