"""What a sampler is: one class that says its coefficients, its call plan and its state.

Every sampler is a coefficient table of the one fused step (``kernels/reverse_step.py``):

    x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clipped to [-1, 1] if asked     (Eq. 15 of Ho et al.)
    x_prev = a x_t + d eps + b x0_hat + c x0_prev + sigma z

over a (possibly respaced) chain tau_1 < ... < tau_S (``ddpm.respace``); position i steps from tau_i to
tau_{i-1}, and position 0 to clean data (abar = 1). Column i of a table is the step from position i;
rows follow ``kernels.reverse_step.StepCoefficients``. Tables are derived in float64, next to the
equation they implement, and handed to the kernel in float32.

A sampler whose chain visits positions more than once (restart's jumps back up) plans its own calls:
(position, positions jumped back up right after its step), one column per call in the order they run,
and the jump rides on the step before it (``kernels.reverse_step.EditTerms``).

Adding a sampler: one module in this package with one ``SamplerRule`` subclass, and its name in
``ddpm.names.Sampler``; nothing else names it (``tests/test_package_structure.py``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ddpm.schedule import NoiseSchedule, VarianceType
from kernels.reverse_step import StepCoefficients

ROWS = StepCoefficients.names()  # the kernel's row order
Call = tuple[int, int]  # (chain position, positions jumped back up after its step; 0: none)


def step_table(chain: NoiseSchedule, clip: bool, **rows: np.ndarray) -> np.ndarray:
    """An (8, S) table with Eq. 15's x0_hat rows filled and the named update weights (the rest 0)."""
    s = chain.num_timesteps
    table = np.zeros((len(ROWS), s), dtype=np.float64)
    table[ROWS.index("x0_from_x")] = chain.sqrt_recip_alphas_cumprod  # Eq. 15 solved for x_0
    table[ROWS.index("x0_from_eps")] = chain.sqrt_recipm1_alphas_cumprod
    table[ROWS.index("clip")] = 1.0 if clip else 0.0
    for name, value in rows.items():
        table[ROWS.index(name)] = value
    return table


class SamplerRule:
    """One sampler. Subclasses set ``name`` (a ``ddpm.names.Sampler`` value) and ``table``; the defaults
    describe a single-step sampler that visits each position once."""

    name: ClassVar[str]
    multistep: ClassVar[bool] = False  # a step reads the previous step's x0_hat (state that travels with the sample)
    takes_eta: ClassVar[bool] = False  # DDIM's eta (the noise scale) applies
    full_chain_by_default: ClassVar[bool] = False  # named without steps, it runs the model's T steps (the paper's chain)
    shortest_with_jumps: ClassVar[int | None] = None  # the fewest calls whose own plan jumps back up (None: never)

    @property
    def inpaints(self) -> bool:
        """RePaint's resampling jumps back up along the chain: a multistep history would not follow it."""
        return not self.multistep

    def positions(self, steps: int) -> int:
        """The chain's positions for a request of ``steps`` U-Net calls."""
        return steps

    def calls(self, steps: int) -> list[Call] | None:
        """The sampler's own call plan, when it visits positions more than once (None: each once, S-1 down to 0)."""
        return None

    def table(self, chain: NoiseSchedule, *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        """The (8, S) float64 table, a column per position."""
        raise NotImplementedError

    def call_table(self, chain: NoiseSchedule, calls: list[Call], *, variance_type: VarianceType, eta: float, clip: bool) -> np.ndarray:
        """The (8, K) float64 table in call order (RePaint's plan, or the sampler's own)."""
        return self.table(chain, variance_type=variance_type, eta=eta, clip=clip)[:, [position for position, _ in calls]]
