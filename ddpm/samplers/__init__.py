"""The samplers, one module each (``base.py`` says what a sampler is): the registry by name.

- ``ddpm`` (``ancestral.py``): Algorithm 2 of Ho et al. 2020;
- ``ddim`` (``ddim.py``): Song, Meng & Ermon 2021;
- ``dpmsolver++``, ``sde-dpmsolver++`` (``dpm_solver.py``): DPM-Solver++(2M) of Lu et al. 2022, ODE and SDE;
- ``restart`` (``restart.py``): restart sampling (Xu et al. 2023) on SDE-DPM-Solver++(2M).

Each is a coefficient table of the one fused step (``kernels/reverse_step.py``); ``ddpm.chain`` asks the
sampler for its positions, its call plan and its table, and knows no sampler by name.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np

from ddpm.names import SAMPLERS, Sampler
from ddpm.samplers.base import Call, SamplerRule
from ddpm.schedule import NoiseSchedule, VarianceType

__all__ = ["SAMPLERS", "Call", "Sampler", "SamplerRule", "coefficient_table", "sampler_rule", "step_variants"]


def _discover() -> dict[str, SamplerRule]:
    """Every ``SamplerRule`` subclass of this package's modules, in ``Sampler``'s order."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, SamplerRule] = {}
    classes = list(SamplerRule.__subclasses__())
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "name" in vars(cls):
            if cls.name in found:
                raise RuntimeError(f"two samplers are named {cls.name!r}")
            found[cls.name] = cls()
    missing = [s.value for s in Sampler if s.value not in found]
    if missing or len(found) != len(Sampler):
        raise RuntimeError(f"samplers without a module: {missing}; modules without a name in ddpm.names: {set(found) - set(SAMPLERS)}")
    return {s.value: found[s.value] for s in Sampler}


RULES = _discover()


def sampler_rule(sampler: Sampler | str) -> SamplerRule:
    """The sampler named ``sampler`` (a ValueError for an unknown name)."""
    return RULES[Sampler(sampler).value]


def coefficient_table(
    chain: NoiseSchedule, sampler: Sampler | str, *, variance_type: VarianceType, eta: float = 0.0, clip: bool = True
) -> np.ndarray:
    """The (8, S) float64 table of ``sampler`` over ``chain``, a column per position."""
    return sampler_rule(sampler).table(chain, variance_type=variance_type, eta=eta, clip=clip)


def step_variants() -> list[SamplerRule]:
    """One sampler per variant of the fused step the samplers make (single step; multistep state; multistep
    with jumps back up), the first in ``Sampler``'s order: what a warm-up runs to meet every variant."""
    variants: dict[tuple[bool, bool], SamplerRule] = {}
    for rule in RULES.values():
        variants.setdefault((rule.multistep, rule.shortest_with_jumps is not None), rule)
    return list(variants.values())


def inpainting_samplers() -> list[str]:
    """The samplers RePaint can run with (its jumps back up break a multistep history)."""
    return [name for name, rule in RULES.items() if rule.inpaints]
