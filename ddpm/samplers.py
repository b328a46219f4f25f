"""The samplers as per-step coefficient tables of one affine update (``kernels/reverse_step.py``):

    x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clipped to [-1, 1] if asked     (Eq. 15 of Ho et al.)
    x_prev = a x_t + d eps + b x0_hat + c x0_prev + sigma z

over a (possibly respaced) chain tau_1 < ... < tau_S (``ddpm.respace``); position i steps from tau_i
to tau_{i-1}, and position 0 to clean data (abar = 1). Every table is derived in float64 here, next to
the equation it implements, and handed to the kernel in float32. Column i of a table is the step
from position i; rows follow ``kernels.reverse_step.StepCoefficients``.

- ``ddpm``: Algorithm 2 of Ho et al. 2020 (Eq. 11, or the posterior mean of Eq. 7 when x0 is clipped);
- ``ddim``: Song, Meng & Ermon 2021, Eq. 12 with sigma from Eq. 16 scaled by eta (eta = 0: deterministic,
  eta = 1: the DDPM posterior variance); as diffusers' DDIMScheduler (``use_clipped_model_output=False``),
  the direction term uses the model's eps even when x0_hat is clipped;
- ``dpmsolver++``: DPM-Solver++(2M) of Lu et al. 2022 (Alg. 2, the multistep second-order solver on
  the data prediction x0_hat), midpoint form as diffusers' DPMSolverMultistepScheduler; first order at
  the first step (no history yet) and at the last step, which lands on sigma = 0 (diffusers'
  ``final_sigmas_type="zero"``, where the second-order weight is undefined);
- ``sde-dpmsolver++``: SDE-DPM-Solver++(2M), the same multistep solver for the reverse SDE (fresh noise
  every step), as diffusers' ``algorithm_type="sde-dpmsolver++"``;
- ``restart``: restart sampling on SDE-DPM-Solver++(2M) (``ddpm.restart``): these tables' columns, one
  per call, and a forward jump back up (the fused step's editing terms, without a mask).
"""

from __future__ import annotations

import numpy as np

from ddpm.names import SAMPLERS, Sampler
from ddpm.schedule import NoiseSchedule, VarianceType
from kernels.reverse_step import StepCoefficients

__all__ = ["SAMPLERS", "Sampler", "coefficient_table"]
ROWS = StepCoefficients.names()  # the kernel's row order


def _table(chain: NoiseSchedule, clip: bool, **rows: np.ndarray) -> np.ndarray:
    s = chain.num_timesteps
    table = np.zeros((len(ROWS), s), dtype=np.float64)
    table[0] = chain.sqrt_recip_alphas_cumprod  # Eq. 15 solved for x_0
    table[1] = chain.sqrt_recipm1_alphas_cumprod
    table[2] = 1.0 if clip else 0.0
    for name, value in rows.items():
        table[ROWS.index(name)] = value
    return table


def ddpm_table(chain: NoiseSchedule, variance_type: VarianceType, clip: bool) -> np.ndarray:
    """Algorithm 2, line 4, at every position of the chain."""
    sigma = np.sqrt(chain.variance(variance_type))
    sigma = np.append(0.0, sigma[1:])  # z = 0 at the last step (t = 1)
    if clip:  # Eq. 7: mu_tilde = coef1 x0 + coef2 x_t, with x0 clipped
        return _table(chain, True, x=chain.posterior_mean_coef2, x0=chain.posterior_mean_coef1, sigma=sigma)
    # Eq. 11: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z
    recip_sqrt_alpha = 1.0 / np.sqrt(chain.alphas)
    return _table(chain, False, x=recip_sqrt_alpha, eps=-recip_sqrt_alpha * chain.betas / chain.sqrt_one_minus_alphas_cumprod, sigma=sigma)


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
    return _table(chain, clip, x0=np.sqrt(abar_prev), eps=direction, sigma=sigma)


def dpmsolver_table(chain: NoiseSchedule, clip: bool, sde: bool = False, first_order: bool = False) -> np.ndarray:
    """DPM-Solver++(2M), data prediction, in lambda_t = log(alpha_t / sigma_t) with alpha_t = sqrt(abar_t)
    and sigma_t = sqrt(1 - abar_t); for the step from s = tau_i to t = tau_{i-1}, h = lambda_t - lambda_s:

        first order:  x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x0_s       (DPM-Solver++(1), = DDIM eta 0)
        second order: x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) ((1 + 1/(2r)) x0_s - 1/(2r) x0_prev)
                      with r = h_prev / h, the previous step's h over this one's        (DPM-Solver++(2M), Alg. 2)

    ``sde``: SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5 / App. B; diffusers' ``sde-dpmsolver++``), the same
    multistep data term with e^{-h} - 1 replaced by e^{-2h} - 1, x_s weighted by sigma_t / sigma_s e^{-h},
    and fresh noise sigma_t sqrt(1 - e^{-2h}) z at every step.

    ``first_order``: every column first order (DPM-Solver++(1)): the steps that follow a jump back up,
    which has no previous prediction on its path (``ddpm.restart``).
    """
    abar = chain.alphas_cumprod
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(sigma)
    s = chain.num_timesteps
    a, b, c = np.zeros(s), np.zeros(s), np.zeros(s)
    b[0] = 1.0  # the last step lands on sigma = 0, alpha = 1: x_0 = x0_hat (first order, h = inf)
    noise = np.zeros(s)
    for i in range(1, s):
        h = lam[i - 1] - lam[i]
        if sde:
            phi = alpha[i - 1] * np.expm1(-2.0 * h)  # alpha_t (e^{-2h} - 1)
            a[i] = sigma[i - 1] / sigma[i] * np.exp(-h)
            noise[i] = sigma[i - 1] * np.sqrt(-np.expm1(-2.0 * h))
        else:
            phi = alpha[i - 1] * np.expm1(-h)  # alpha_t (e^{-h} - 1)
            a[i] = sigma[i - 1] / sigma[i]
        if i == s - 1 or first_order:  # the first step: no previous prediction yet
            b[i] = -phi
        else:
            r = (lam[i] - lam[i + 1]) / h
            b[i] = -phi * (1.0 + 0.5 / r)
            c[i] = phi * 0.5 / r
    return _table(chain, clip, x=a, x0=b, x0_prev=c, sigma=noise)


def coefficient_table(
    chain: NoiseSchedule, sampler: Sampler | str, *, variance_type: VarianceType, eta: float = 0.0, clip: bool = True
) -> np.ndarray:
    """The (8, S) float64 table of ``sampler`` over ``chain``."""
    sampler = Sampler(sampler)
    if sampler is Sampler.RESTART:
        raise ValueError("restart's table has a column per call, not per position: ddpm.restart.restart_table")
    if sampler is Sampler.DDPM:
        return ddpm_table(chain, VarianceType(variance_type), clip)
    if sampler is Sampler.DDIM:
        return ddim_table(chain, eta, clip)
    return dpmsolver_table(chain, clip, sde=sampler is Sampler.SDE_DPM_SOLVER)
