"""``dpmsolver++`` and ``sde-dpmsolver++``: DPM-Solver++(2M) of Lu et al. 2022 (Alg. 2, the multistep
second-order solver on the data prediction x0_hat), midpoint form as diffusers'
DPMSolverMultistepScheduler, for the probability-flow ODE and for the reverse SDE (fresh noise every
step, diffusers' ``algorithm_type="sde-dpmsolver++"``): one solver, two samplers, as diffusers' one
scheduler class. First order at the first step (no history yet) and at the last step, which lands on
sigma = 0 (diffusers' ``final_sigmas_type="zero"``, where the second-order weight is undefined). The
multistep state (the previous step's x0_hat) travels with each sample (``RunningBatch.x0_prev``)."""

from __future__ import annotations

import numpy as np

from ddpm.names import Sampler
from ddpm.samplers.base import SamplerRule, step_table
from ddpm.schedule import NoiseSchedule, VarianceType


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
    which has no previous prediction on its path (``ddpm.samplers.restart``).
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
    return step_table(chain, clip, x=a, x0=b, x0_prev=c, sigma=noise)


class DPMSolver(SamplerRule):
    name = Sampler.DPM_SOLVER.value
    multistep = True

    def table(self, chain: NoiseSchedule, *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        return dpmsolver_table(chain, clip)


class SDEDPMSolver(SamplerRule):
    name = Sampler.SDE_DPM_SOLVER.value
    multistep = True

    def table(self, chain: NoiseSchedule, *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        return dpmsolver_table(chain, clip, sde=True)
