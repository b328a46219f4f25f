"""Restart sampling (Xu et al., NeurIPS 2023, "Restart Sampling for Improving Generative Processes") on
SDE-DPM-Solver++(2M): a few U-Net calls spent going back up and down the end of the chain.

A request of S U-Net calls runs a main chain of M = S - K positions tau_{M-1} > ... > tau_0 (the
request's spacing) with SDE-DPM-Solver++(2M) (``ddpm.samplers.dpm_solver``), and one restart
interval over its last K steps above clean data. After the step that lands on tau_0's level the sample
jumps back up K positions by the forward process (Xu et al. Alg. 1, the restart forward step; Ho et al.
Eq. 4 between two noise levels, one Gaussian):

    x_{tau_K} = sqrt(abar_{tau_K} / abar_{tau_0}) x_{tau_0} + sqrt(1 - abar_{tau_K} / abar_{tau_0}) xi,

solves back down to tau_0 with K steps of the probability-flow ODE (DPM-Solver++(2M): first order right
after the jump, which has no earlier prediction on its path), and takes the main chain's last step to
clean data. The forward jump is the same one RePaint's resampling makes (``ddpm.editing.edit_table``),
composed into the fused step before it (``kernels.reverse_step.EditTerms``, no mask): one launch per call.

K = 2 for S >= 5, 1 for S = 4, none below (then this is SDE-DPM-Solver++(2M)). Why this interval: the
paper places restarts at low noise, where the ODE's errors accumulate; measured on the shipped model
(BENCHMARKS.md, "Samplers"), at 10 calls one restart over the last two steps brings FD from the
SDE solver's ~11.8 to ~8.0 with the same confident share.
"""

from __future__ import annotations

import numpy as np

from ddpm.names import Sampler
from ddpm.samplers.base import Call, SamplerRule
from ddpm.samplers.dpm_solver import dpmsolver_table
from ddpm.schedule import NoiseSchedule, VarianceType


def restart_length(steps: int) -> int:
    """K, the positions the restart jumps back up (and the ODE calls it adds)."""
    return 2 if steps >= 5 else 1 if steps == 4 else 0


def main_steps(steps: int) -> int:
    """M, the positions of the main chain for a request of ``steps`` U-Net calls."""
    return steps - restart_length(steps)


def restart_calls(steps: int) -> list[Call]:
    """The U-Net calls in the order they run: the main chain down to position 1, the jump, the restart's
    K positions down again, the last step."""
    k, m = restart_length(steps), main_steps(steps)
    if k == 0:
        return [(p, 0) for p in reversed(range(m))]
    main = [(p, k if p == 1 else 0) for p in range(m - 1, 0, -1)]
    return main + [(p, 0) for p in range(k, 0, -1)] + [(0, 0)]


def restart_table(chain: NoiseSchedule, clip: bool, calls: list[Call]) -> np.ndarray:
    """(8, len(calls)) float64 step coefficients in call order: SDE-DPM-Solver++(2M)'s columns for the
    main chain, the ODE's (first order after the jump, then 2M) for the calls after a jump."""
    sde = dpmsolver_table(chain, clip, sde=True)
    ode = dpmsolver_table(chain, clip, sde=False)
    ode_first = dpmsolver_table(chain, clip, sde=False, first_order=True)
    columns, restarting, after_jump = [], False, False
    for position, jump in calls:
        if position == 0:  # the last step lands on clean data: x_0 = x0_hat in every table
            columns.append(sde[:, 0])
        elif after_jump:
            columns.append(ode_first[:, position])
        else:
            columns.append((ode if restarting else sde)[:, position])
        after_jump = jump > 0
        restarting = restarting or after_jump
    return np.stack(columns, axis=1)


class Restart(SamplerRule):
    name = Sampler.RESTART.value
    multistep = True
    shortest_with_jumps = 4  # restart_length(4) = 1

    def positions(self, steps: int) -> int:
        return main_steps(steps)

    def calls(self, steps: int) -> list[Call]:
        return restart_calls(steps)

    def table(self, chain: NoiseSchedule, *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        raise ValueError("a restart chain has a column per call, not per position: its calls (restart_calls, ChainTables.for_spec)")

    def call_table(self, chain: NoiseSchedule, calls: list[Call], *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        return restart_table(chain, clip, calls)
