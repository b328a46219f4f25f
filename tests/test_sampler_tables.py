"""DDIM and DPM-Solver++(2M) as coefficient tables: against the papers' equations in float64, against
each other where they coincide, and over whole chains against diffusers' schedulers on the same U-Net
and the same noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.chain import ChainTables
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.respace import respace_steps, spaced_timesteps
from ddpm.samplers import coefficient_table
from ddpm.samplers.ddim import ddim_sigma
from ddpm.schedule import VarianceType, make_schedule
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from kernels.reverse_step import reverse_step
from tests.test_reverse_chain import _save_diffusers_dir

SCHEDULE = make_schedule("linear", 1000)


def _apply(table: np.ndarray, i: int, x: np.ndarray, eps: np.ndarray, z: np.ndarray, x0_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The affine update in float64 numpy, column i of a table."""
    p, q, clip, a, d, b, c, s = table[:, i]
    x0 = p * x - q * eps
    if clip:
        x0 = np.clip(x0, -1, 1)
    return a * x + d * eps + b * x0 + c * x0_prev + s * z, x0


def test_spacings_match_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    for spacing, offset in [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)]:
        for steps in [1, 7, 10, 50, 999, 1000]:
            if spacing == "leading" and offset == 1 and steps > 500:
                continue  # 1000 // steps = 1: the offset pushes the last timestep to T
            if spacing == "linspace" and steps == 1:
                continue  # diffusers gives [0]: one step from nearly clean data; ours keeps T - 1 (x_T is noise)
            d = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
            d.set_timesteps(steps)
            ours = spaced_timesteps(1000, steps, spacing, offset)
            np.testing.assert_array_equal(ours[::-1], d.timesteps.numpy(), err_msg=f"{spacing} {offset} {steps}")
    with pytest.raises(ValueError, match=r"leaves 0\.\.999"):
        spaced_timesteps(1000, 1000, "leading", 1)
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 10, "random")


def test_ddim_at_eta_1_is_the_ddpm_posterior() -> None:
    """DDIM Sec. 4.1: with sigma from Eq. 16 at eta = 1 the update is DDPM's Eq. 7 (fixed_small), unclipped."""
    chain = respace_steps(SCHEDULE, 20)
    ddim = coefficient_table(chain, "ddim", variance_type=VarianceType.FIXED_SMALL, eta=1.0, clip=False)
    ddpm = coefficient_table(chain, "ddpm", variance_type=VarianceType.FIXED_SMALL, clip=False)
    np.testing.assert_allclose(ddim[7, 1:], np.sqrt(chain.posterior_variance[1:]), rtol=1e-12)
    rng = np.random.default_rng(0)
    x, eps, z = rng.standard_normal((3, 64))
    for i in range(20):
        np.testing.assert_allclose(_apply(ddim, i, x, eps, z, 0 * x)[0], _apply(ddpm, i, x, eps, z, 0 * x)[0], atol=1e-10)


def test_ddim_eta_0_is_deterministic_and_lands_on_x0() -> None:
    chain = respace_steps(SCHEDULE, 10, "trailing")
    table = coefficient_table(chain, "ddim", variance_type=VarianceType.FIXED_SMALL, eta=0.0, clip=True)
    assert (table[7] == 0).all() and (table[6] == 0).all()
    assert table[5, 0] == 1.0 and table[4, 0] == 0.0  # position 0 returns x0_hat
    np.testing.assert_allclose(ddim_sigma(chain, 0.5), 0.5 * ddim_sigma(chain, 1.0))
    with pytest.raises(ValueError, match="eta"):
        coefficient_table(chain, "ddim", variance_type=VarianceType.FIXED_SMALL, eta=1.5)


def test_dpmsolver_first_and_last_steps_are_first_order() -> None:
    chain = respace_steps(SCHEDULE, 10, "trailing")
    table = coefficient_table(chain, "dpmsolver++", variance_type=VarianceType.FIXED_SMALL, clip=False)
    assert table[6, -1] == 0 and table[6, 0] == 0 and (table[6, 1:-1] != 0).all()
    assert (table[7] == 0).all() and (table[4] == 0).all()  # deterministic, data prediction only
    # first order in x0 is DDIM at eta = 0 (Lu et al. 2022, Sec. 4): same a, b at the first step
    ddim = coefficient_table(chain, "ddim", variance_type=VarianceType.FIXED_SMALL, eta=0.0, clip=False)
    rng = np.random.default_rng(1)
    x, eps = rng.standard_normal((2, 32))
    np.testing.assert_allclose(_apply(table, 9, x, eps, 0 * x, 0 * x)[0], _apply(ddim, 9, x, eps, 0 * x, 0 * x)[0], atol=1e-10)
    # the second-order weights sum to the first-order weight (D0 + 0.5 D1 is an extrapolation)
    lam = 0.5 * np.log(chain.alphas_cumprod / (1 - chain.alphas_cumprod))
    first = -(chain.alphas_cumprod[4] ** 0.5) * np.expm1(-(lam[4] - lam[5]))
    np.testing.assert_allclose(table[5, 5] + table[6, 5], first, rtol=1e-12)


def _diffusers_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "variance_type": "fixed_small", "clip_sample": False}
    return load_model_source(_save_diffusers_dir(tmp_path, config)), config


@pytest.mark.parametrize(
    ("spacing", "offset", "steps", "eta", "clip"),
    [("leading", 1, 20, 0.0, False), ("trailing", 0, 10, 0.0, True), ("trailing", 0, 25, 1.0, False), ("leading", 0, 50, 0.5, True)],
)
def test_ddim_chain_matches_diffusers(tmp_path: Path, spacing: str, offset: int, steps: int, eta: float, clip: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    model, _ = _diffusers_model(tmp_path)
    seeds = seeds_to_tensor(image_seeds(5, 2))
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps, sampler="ddim", eta=eta,
                      spacing=spacing, steps_offset=offset, clip_denoised=clip)  # fmt: skip
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                                            timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=True)  # fmt: skip
        scheduler.set_timesteps(steps)
        x = sample_noise(seeds, 0, model.image_shape)
        for t in scheduler.timesteps:
            eps = model.eps_model(x, t.repeat(2))
            z = sample_noise(seeds, int(t) + 1, model.image_shape)  # ours draws the z of x_t at counter t + 1
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
    err = (ours - x).abs().max().item() / max(1.0, x.abs().max().item())
    assert err < 3e-4, err  # float32 coefficients (diffusers) against float64-derived ones (ours)
    assert (ours[0] - ours[1]).abs().max().item() > 0.05


@pytest.mark.parametrize(("spacing", "steps"), [("trailing", 10), ("trailing", 20), ("linspace", 15), ("leading", 5)])
def test_dpmsolver_chain_matches_diffusers(tmp_path: Path, spacing: str, steps: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    model, _ = _diffusers_model(tmp_path)
    seeds = seeds_to_tensor(image_seeds(9, 2))
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps, sampler="dpmsolver++",
                      spacing=spacing, clip_denoised=False)  # fmt: skip
        scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                          algorithm_type="dpmsolver++", solver_order=2)  # fmt: skip
        # diffusers' own linspace/leading for this scheduler take S + 1 points and drop one: pass ours
        scheduler.set_timesteps(timesteps=[int(t) for t in spaced_timesteps(1000, steps, spacing)[::-1]])
        x = sample_noise(seeds, 0, model.image_shape)
        for t in scheduler.timesteps:
            x = scheduler.step(model.eps_model(x, t.repeat(2)), t, x).prev_sample
    err = (ours - x).abs().max().item() / max(1.0, x.abs().max().item())
    assert err < 3e-4, err
    assert (ours[0] - ours[1]).abs().max().item() > 0.05


@pytest.mark.parametrize("steps", [6, 12])
def test_sde_dpmsolver_chain_matches_diffusers(tmp_path: Path, steps: int) -> None:
    """SDE-DPM-Solver++(2M) with diffusers fed the same z: ours draws the z of the step from x_t at counter t + 1."""
    diffusers = pytest.importorskip("diffusers")
    model, _ = _diffusers_model(tmp_path)
    seeds = seeds_to_tensor(image_seeds(4, 2))
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps, sampler="sde-dpmsolver++",
                      spacing="trailing", clip_denoised=False)  # fmt: skip
        scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        x = sample_noise(seeds, 0, model.image_shape)
        for t in scheduler.timesteps:
            z = sample_noise(seeds, int(t) + 1, model.image_shape)
            x = scheduler.step(model.eps_model(x, t.repeat(2)), t, x, variance_noise=z).prev_sample
    err = (ours - x).abs().max().item() / max(1.0, x.abs().max().item())
    assert err < 3e-4, err
    ode = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps, sampler="dpmsolver++", spacing="trailing",
                 clip_denoised=False)  # fmt: skip
    assert (ours - ode).abs().max().item() > 0.05  # the noise is really there


def test_dpmsolver_trailing_matches_diffusers_own_spacing(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    model, _ = _diffusers_model(tmp_path)
    seeds = seeds_to_tensor(image_seeds(2, 1))
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing")
    scheduler.set_timesteps(8)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), spaced_timesteps(1000, 8, "trailing")[::-1])
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=8, sampler="dpmsolver++", spacing="trailing",
                      clip_denoised=False)  # fmt: skip
        x = sample_noise(seeds, 0, model.image_shape)
        for t in scheduler.timesteps:
            x = scheduler.step(model.eps_model(x, t.repeat(1)), t, x).prev_sample
    assert (ours - x).abs().max().item() < 3e-4


def test_one_table_column_is_what_the_step_applies() -> None:
    chain = respace_steps(SCHEDULE, 12, "trailing")
    tables = ChainTables(chain, VarianceType.FIXED_SMALL, sampler="dpmsolver++", clip=True)
    gen = torch.Generator().manual_seed(3)
    x, eps, x0_prev = (torch.randn(2, 1, 4, 4, generator=gen) * 2 for _ in range(3))
    pos = torch.tensor([5, 5])
    out, x0 = reverse_step(x, eps, tables.coefficients(pos), torch.zeros_like(x), x0_prev)
    exp, exp_x0 = _apply(tables.table64, 5, x.double().numpy(), eps.double().numpy(), 0, x0_prev.double().numpy())
    assert x0 is not None and x0.abs().max() <= 1
    np.testing.assert_allclose(out.numpy(), exp, atol=2e-5)
    np.testing.assert_allclose(x0.numpy(), exp_x0, atol=2e-6)


def test_the_cli_offers_every_sampler_and_spacing() -> None:
    from commands.main import build_parser
    from ddpm.respace import SPACINGS
    from ddpm.samplers import SAMPLERS

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("sample", "eval", "generate"):
        choices = {a.dest: a.choices for a in commands[name]._actions}
        assert tuple(choices["sampler"]) == SAMPLERS and tuple(choices["spacing"]) == SPACINGS, name


def test_a_diffusers_model_samples_at_its_own_spacing_as_ddpm_pipeline_does(tmp_path: Path) -> None:
    """DDPMPipeline(num_inference_steps=S) uses the scheduler config's timestep_spacing (default leading)
    and steps_offset; steps=S on the loaded model visits the same timesteps."""
    diffusers = pytest.importorskip("diffusers")
    config = {"num_train_timesteps": 1000, "clip_sample": True, "timestep_spacing": "leading", "steps_offset": 1}
    model = load_model_source(_save_diffusers_dir(tmp_path, config))
    assert (model.timestep_spacing, model.steps_offset) == ("leading", 1)
    scheduler = diffusers.DDPMScheduler(**config)
    scheduler.set_timesteps(25)
    ours = spaced_timesteps(1000, 25, model.timestep_spacing, model.steps_offset)
    np.testing.assert_array_equal(ours[::-1], scheduler.timesteps.numpy())
    bad = tmp_path / "bad"
    _save_diffusers_dir(bad, {"num_train_timesteps": 1000, "timestep_spacing": "karras"})
    from ddpm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="timestep_spacing"):
        load_model_source(bad)
