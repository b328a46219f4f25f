"""Restart sampling (ddpm/samplers/restart.py): the call plan, the chain against a float64 implementation written
from the papers' equations here, and the engine mixing it with other samplers (GET /schedule's table of
it: tests/test_chain_requests.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.respace import spaced_timesteps
from ddpm.samplers.restart import main_steps, restart_calls
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from service.engine.engine import Engine
from service.engine.job import Job
from tests.batch_rounding import BATCH_ROUNDING
from tests.engine_jobs import wait_done
from tests.tiny_model import random_tiny_unet, tiny_loaded_model


@pytest.mark.parametrize("steps", range(1, 13))
def test_every_request_gets_its_calls_and_one_jump_from_four(steps: int) -> None:
    calls = restart_calls(steps)
    assert len(calls) == steps == ChainSpec(steps, "restart").unet_calls
    jumps = [(p, j) for p, j in calls if j]
    k = 2 if steps >= 5 else 1 if steps == 4 else 0
    assert jumps == ([(1, k)] if k else []) and main_steps(steps) == steps - k
    # the main chain down to position 1, back up k positions, down to 1 again, then the last step
    positions = [p for p, _ in calls]
    assert positions[-1] == 0 and positions.count(0) == 1 and positions.count(1) == (2 if k else min(1, steps - 1))


def _plan(steps: int) -> list[tuple[int, str, int]]:
    """(position, dynamics, jump) per call, from the paper's description (not ddpm.samplers.restart)."""
    k = 2 if steps >= 5 else 1 if steps == 4 else 0
    m = steps - k
    main = [(p, "sde", k if p == 1 and k else 0) for p in range(m - 1, 0, -1)]
    inner = [(p, "ode", 0) for p in range(k, 0, -1)]
    return main + inner + [(0, "sde", 0)]


def _reference(model, seeds: torch.Tensor, steps: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """SDE-DPM-Solver++(2M) (Lu et al. 2022) with one restart (Xu et al. 2023) in float64, the noise of
    each call from the image's Philox stream at counter T + S - call (calls count down to T + 1, as
    RePaint's do; x_T at 0), the jump's Gaussian and the step's summed into one (their variances add)."""
    big_t = model.schedule.num_timesteps
    taus = spaced_timesteps(big_t, main_steps(steps), "trailing")  # increasing: position p is taus[p]
    abar_all = np.asarray(model.schedule.alphas_cumprod, dtype=np.float64)
    abar = np.append(1.0, abar_all[taus])  # level[p + 1] = abar of position p; level[0] = clean data
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(np.maximum(sigma, 1e-300))
    x = sample_noise(seeds, 0, model.image_shape).double()
    prev: tuple[torch.Tensor, float] | None = None
    for call, (p, dynamics, jump) in enumerate(_plan(steps)):
        t = torch.full((x.shape[0],), int(taus[p]), dtype=torch.long)
        with torch.inference_mode():
            eps = model.eps_model(x.float(), t).double()
        x0 = ((x - sigma[p + 1] * eps) / alpha[p + 1]).clamp(-1, 1)  # Ho et al. Eq. 15
        z = sample_noise(seeds, big_t + steps - call, model.image_shape).double()
        if p == 0:
            x = x0
            break
        s_, t_ = p + 1, p  # from position p's level to position p - 1's
        h = lam[t_] - lam[s_]
        if dynamics == "sde":
            mean = sigma[t_] / sigma[s_] * math.exp(-h) * x + alpha[t_] * -math.expm1(-2 * h) * x0
            d_coef, std = 0.5 * alpha[t_] * -math.expm1(-2 * h), sigma[t_] * math.sqrt(-math.expm1(-2 * h))
        else:
            mean = sigma[t_] / sigma[s_] * x - alpha[t_] * math.expm1(-h) * x0
            d_coef, std = -0.5 * alpha[t_] * math.expm1(-h), 0.0
        if prev is not None:  # second order: D1 = (x0 - x0_prev) / r, r = h_prev / h
            mean = mean + d_coef * (x0 - prev[0]) / ((lam[s_] - prev[1]) / h)
        prev = (x0, lam[s_])
        if jump:  # forward process from position p - 1's level up to position p - 1 + jump's (Ho et al. Eq. 4)
            ratio = abar[t_ + jump] / abar[t_]
            x = math.sqrt(ratio) * mean + math.sqrt(ratio * std**2 + 1 - ratio) * z
            prev = None  # nothing on the new path yet: first order
        else:
            x = mean + std * z
    return x


@pytest.mark.parametrize("steps", [3, 4, 6, 10])
def test_the_chain_is_the_papers_equations(steps: int) -> None:
    model = tiny_loaded_model(random_tiny_unet())
    seeds = seeds_to_tensor(image_seeds(5, 3))
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps, sampler="restart",
                      spacing="trailing", variance_type=model.variance_type, clip_denoised=True)  # fmt: skip
    assert (ours.double() - _reference(model, seeds, steps)).abs().max().item() < 1e-4


def test_the_engine_mixes_restart_with_other_samplers(model_dir: Path) -> None:
    """Image k of a restart request is the offline chain's, beside requests of other samplers in one batch."""
    model = load_model_source(model_dir)
    engine = Engine(model, max_batch=8)
    specs = [ChainSpec(6, "restart", spacing="trailing"), ChainSpec(5, "ddpm"), ChainSpec(7, "sde-dpmsolver++", spacing="trailing"),
             ChainSpec(4, "restart", spacing="linspace")]  # fmt: skip
    jobs = [Job(ImageRequest(20 + i, 2, spec), timeout_s=60) for i, spec in enumerate(specs)]
    for job in jobs:
        engine.submit(job)
    engine.start()
    try:
        wait_done(*jobs, timeout=120)
    finally:
        engine.stop()
    for job, spec in zip(jobs, specs, strict=True):
        assert job.error is None and job.images is not None
        with torch.inference_mode():
            alone = sample(model.eps_model, model.schedule, seeds_to_tensor(image_seeds(job.seed, 2)), model.image_shape, steps=spec.steps,
                           sampler=spec.sampler, spacing=spec.spacing, variance_type=model.variance_type, clip_denoised=True)  # fmt: skip
        # the U-Net at another batch size rounds differently: the contract's bound, not the chain
        torch.testing.assert_close(job.images, alone, rtol=0, atol=BATCH_ROUNDING, msg=str(spec))
