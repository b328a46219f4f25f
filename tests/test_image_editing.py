"""Editing with the fused step: RePaint's schedule and chain against diffusers' RePaintScheduler on the
same U-Net and noise, the known pixels kept exactly, SDEdit's start and span, the kernel against its
twin on batches mixing plain, inpainting and jumping rows, and the engine serving all of them at once."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.chain import ChainSpec, ChainTables
from ddpm.editing import repaint_calls, sdedit_start
from ddpm.image_request import EditInput, ImageRequest
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.schedule import VarianceType, make_schedule
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from kernels.reverse_step import EditTerms, StepCoefficients, fused_reverse_step_torch, fused_reverse_step_triton
from service.engine.engine import Engine
from service.engine.job import Job
from tests.test_reverse_chain import _save_diffusers_dir
from tests.tiny_model import tiny_loaded_model

SHAPE = (1, 8, 8)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _input_and_mask(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(SHAPE, generator=gen) * 2 - 1
    mask = torch.ones(SHAPE)
    mask[:, 4:, :] = 0.0  # repaint the bottom half
    return image, mask


@pytest.mark.parametrize(("steps", "jump_length", "jump_n_sample"), [(40, 3, 2), (25, 5, 3), (10, 10, 4), (12, 1, 1)])
def test_the_call_schedule_is_diffusers(steps: int, jump_length: int, jump_n_sample: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=steps)
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    entries, calls, last = scheduler.timesteps.tolist(), [], scheduler.timesteps[0].item() + 1
    for t in entries:  # a U-Net call where the timestep goes down; a jump back up where it goes up
        if t < last:
            calls.append([t, 0])
        else:
            calls[-1][1] += 1
        last = t
    assert [tuple(c) for c in calls] == repaint_calls(steps, jump_length, jump_n_sample)
    assert ChainSpec(steps, "ddim", repaint=True, jump_length=jump_length, jump_n_sample=jump_n_sample).unet_calls == len(calls)


@pytest.mark.parametrize(("eta", "jump_length", "jump_n_sample"), [(0.0, 3, 2), (1.0, 2, 3), (0.5, 4, 1)])
def test_repaint_matches_diffusers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eta: float, jump_length: int, jump_n_sample: int
) -> None:
    """diffusers' RePaintPipeline on the same U-Net, input, mask, x_T and noise (S = T, where both
    place the jump alike). Our jump is composed with its step into one Gaussian; diffusers draws one per
    step and per undo, so it is fed noise whose sum is ours: none in the step, all in the first undo."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_repaint as repaint_module

    num_train = 30
    config = {"num_train_timesteps": num_train, "beta_schedule": "linear", "clip_sample": True}
    model = load_model_source(_save_diffusers_dir(tmp_path, config))
    image, mask = _input_and_mask()
    seeds = seeds_to_tensor(image_seeds(5, 2))
    spec = ChainSpec(num_train, "ddim", eta, True, "leading", 0, 1.0, True, jump_length, jump_n_sample)
    tables = ChainTables.for_spec(model.schedule, model.variance_type, spec)
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, SHAPE, steps=num_train, sampler="ddim", eta=eta, spacing="leading",
                      init_image=image, mask=mask, jump_length=jump_length, jump_n_sample=jump_n_sample)  # fmt: skip

        scheduler = diffusers.RePaintScheduler(**config, eta=eta)
        scheduler.set_timesteps(num_train, jump_length, jump_n_sample)
        betas = scheduler.betas.double()
        noise: list[torch.Tensor] = [sample_noise(seeds, 0, SHAPE)]  # x_T
        for k, (position, jump) in enumerate(repaint_calls(num_train, jump_length, jump_n_sample)):
            i = tables.num_steps - 1 - k  # the call's column
            z = sample_noise(seeds, int(tables.counters[i]), SHAPE)
            if not jump:
                noise.append(z)
                continue
            sigma, (_, known_z, jump_x, jump_z) = float(tables.table64[7, i]), tables.edit_table64[:, i]
            w = jump_x * ((1 - mask) * sigma + mask * known_z)
            total = torch.sqrt(w**2 + jump_z**2)  # the one Gaussian's scale, per element
            first = float(betas[position].sqrt() * torch.prod((1 - betas[position + 1 : position + jump]).sqrt()))
            noise += [torch.zeros_like(z), (total * z / first).float()] + [torch.zeros_like(z)] * (jump - 1)
        noise.reverse()
        fed = lambda *a, **k: noise.pop()  # noqa: E731
        monkeypatch.setattr(repaint_module, "randn_tensor", fed)
        monkeypatch.setattr(importlib.import_module(diffusers.RePaintPipeline.__module__), "randn_tensor", fed)
        unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet")
        pipeline = diffusers.RePaintPipeline(unet=unet, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        out = pipeline(image=image.expand(2, *SHAPE), mask_image=mask.expand(2, *SHAPE), num_inference_steps=num_train, eta=eta,
                       jump_length=jump_length, jump_n_sample=jump_n_sample, output_type="np").images  # fmt: skip
        x = torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1  # the pipeline's [0, 1] NHWC back to our [-1, 1] NCHW
    assert not noise
    err = (ours.clamp(-1, 1) - x).abs().max().item()  # the pipeline clamps its output to [0, 1]
    assert err < 2e-4, err
    assert torch.equal(ours[:, mask.bool()], image[mask.bool()].expand(2, -1))  # the known pixels, exactly
    assert (ours[0] - ours[1]).abs().max().item() > 0.05


def test_sdedit_starts_at_the_strengths_level_and_counts_the_steps_it_runs() -> None:
    schedule = make_schedule("linear", 100)
    assert sdedit_start(100, 1.0) == 100 and sdedit_start(100, 0.5) == 50 and sdedit_start(100, 0.001) == 1
    spec = ChainSpec(10, "ddim", spacing="trailing", strength=0.5)
    tables = ChainTables.for_spec(schedule, VarianceType.FIXED_SMALL, spec)
    assert tables.num_steps == 10 and int(tables.timesteps.max()) == 49 and int(tables.timesteps.min()) >= 0
    abar = schedule.alphas_cumprod[49]
    assert tables.start_x == pytest.approx(np.sqrt(abar)) and tables.start_z == pytest.approx(np.sqrt(1 - abar))
    with pytest.raises(ValueError, match="strength"):
        ChainSpec(10, strength=1.5)
    with pytest.raises(ValueError, match="ddpm or ddim"):
        ChainSpec(10, "dpmsolver++", repaint=True)


def test_sdedit_at_strength_one_is_plain_sampling(tiny_unet: torch.nn.Module) -> None:
    model = tiny_loaded_model(tiny_unet)
    seeds = seeds_to_tensor(image_seeds(1, 2))
    image, _ = _input_and_mask()
    with torch.inference_mode():
        plain = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=10, sampler="ddim")
        edited = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=10, sampler="ddim", strength=1.0,
                        init_image=image.expand(model.image_shape))  # fmt: skip
        low = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=10, sampler="ddim", strength=0.1,
                     init_image=image.expand(model.image_shape))  # fmt: skip
    assert torch.equal(plain, edited)
    # a tenth of the chain from the input stays near it (the noise at t0 is small); from scratch does not
    target = image.expand(model.image_shape).clamp(-1, 1)
    assert (low - target).abs().mean() < 0.5 * (plain - target).abs().mean()


def _edit_batch(b: int, shape: tuple[int, ...]) -> tuple[StepCoefficients, EditTerms]:
    """Rows 0, 3, ...: plain; 1, 4, ...: inpainting; 2, 5, ...: inpainting and a jump back up."""
    gen = torch.Generator().manual_seed(b)
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    coefs = StepCoefficients(rand(b) + 1, rand(b), (rand(b) > 0.5).float(), rand(b), rand(b) - 0.5, rand(b), rand(b), rand(b))
    masked = (torch.arange(b) % 3 != 0).float()
    jump_x = torch.where(torch.arange(b) % 3 == 2, rand(b), torch.ones(b))
    jump_z = torch.where(jump_x != 1, (1 - jump_x**2).sqrt(), torch.zeros(b))
    known = rand(b, *shape) * 2 - 1
    mask = (rand(b, *shape) > 0.5).float()
    return coefs, EditTerms(known, mask, masked, rand(b), rand(b), jump_x, jump_z)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("multistep", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 28, 28)])
def test_kernel_equals_twin_on_mixed_edit_rows(dtype: torch.dtype, channels_last: bool, multistep: bool, shape: tuple[int, ...]) -> None:
    b = 6
    gen = torch.Generator().manual_seed(1)
    x, eps = torch.randn(b, *shape, generator=gen).to(dtype), torch.randn(b, *shape, generator=gen).to(dtype)
    if channels_last:
        x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
    coefs, edit = _edit_batch(b, shape)
    x0_prev = torch.randn(b, *shape) if multistep else None
    seeds, counter = seeds_to_tensor(image_seeds(9, b)), torch.arange(b) + 3
    if DEVICE != "cpu":  # the compiled kernel on the GPU check: CUDA tensors
        move = lambda t: t.to(DEVICE)  # noqa: E731
        x, eps, seeds, counter = move(x), move(eps), move(seeds), move(counter)
        x0_prev = None if x0_prev is None else move(x0_prev)
        coefs = StepCoefficients(*(move(getattr(coefs, n)) for n in StepCoefficients.names()))
        edit = edit.map(move)
    kernel, k0 = fused_reverse_step_triton(x, eps, coefs, seeds, counter, x0_prev, edit)
    twin, t0 = fused_reverse_step_torch(x, eps, coefs, seeds, counter, x0_prev, edit)
    # bf16: one unit in the last place (the interpreter truncates where the twin rounds to nearest)
    atol, rtol = (1e-5, 0.0) if dtype == torch.float32 else (1e-2, 2**-7)
    kernel, twin = kernel.cpu(), twin.cpu()
    assert ((kernel.float() - twin.float()).abs() <= atol + rtol * twin.float().abs()).all()
    if multistep:
        assert (k0.cpu() - t0.cpu()).abs().max().item() <= 1e-5
    # rows that edit nothing are the plain step, bit for bit
    plain, _ = fused_reverse_step_triton(x, eps, coefs, seeds, counter, x0_prev)
    plain, rows = plain.cpu(), ~edit.edits().cpu()
    assert rows.any() and torch.equal(kernel[rows], plain[rows])


def test_two_gaussians_make_one() -> None:
    """The jump composed into the step has the variance of the step's noise then the jump's own."""
    n = 400_000
    sigma, jump_x, jump_z = 0.3, 0.8, 0.6
    coefs = StepCoefficients(*(torch.tensor([v]) for v in (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, sigma)))
    edit = EditTerms(torch.zeros(1, 1, 1, n), torch.zeros(1, 1, 1, n), torch.zeros(1), torch.ones(1), torch.zeros(1),
                     torch.tensor([jump_x]), torch.tensor([jump_z]))  # fmt: skip
    zero = torch.zeros(1, 1, 1, n)
    out, _ = fused_reverse_step_torch(zero, zero, coefs, seeds_to_tensor([7]), torch.tensor([1]), None, edit)
    sequential = jump_x * (sigma * torch.randn(n, generator=torch.Generator().manual_seed(0))) + jump_z * torch.randn(n)
    assert out.var().item() == pytest.approx((jump_x * sigma) ** 2 + jump_z**2, rel=0.01)
    assert out.var().item() == pytest.approx(sequential.var().item(), rel=0.02)


def test_the_engine_serves_plain_sdedit_and_inpainting_in_one_batch(tiny_unet: torch.nn.Module) -> None:
    model = tiny_loaded_model(tiny_unet)
    shape = model.image_shape
    image = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    mask = torch.ones(shape)
    mask[..., :, 4:] = 0.0  # repaint the right half
    kinds = {
        "plain": (ChainSpec(12, "ddim"), None, None),
        "sdedit": (ChainSpec(8, "ddpm", strength=0.6), image, None),
        "inpaint": (ChainSpec(10, "ddim", eta=0.5, spacing="leading", repaint=True, jump_length=3, jump_n_sample=2), image, mask),
        "inpaint-ddpm": (ChainSpec(9, "ddpm", repaint=True), image, mask),
    }
    engine = Engine(model, max_batch=16)
    engine.start()
    try:
        jobs = {name: engine.submit(Job(ImageRequest(i, 2, spec, None, 0.0, None if init is None else EditInput.of(init, m)), timeout_s=60))
                for i, (name, (spec, init, m)) in enumerate(kinds.items())}  # fmt: skip
        assert engine.wait_idle(60)
    finally:
        engine.stop()
    for i, (name, (spec, init, m)) in enumerate(kinds.items()):
        job = jobs[name]
        assert job.error is None, (name, job.error)
        with torch.inference_mode():
            offline = sample(model.eps_model, model.schedule, seeds_to_tensor(image_seeds(i, 2)), shape, steps=spec.steps,
                             variance_type=model.variance_type, sampler=spec.sampler, eta=spec.eta, spacing=spec.spacing,
                             strength=spec.strength, init_image=init, mask=m, jump_length=spec.jump_length,
                             jump_n_sample=spec.jump_n_sample)  # fmt: skip
        assert job.images is not None and (job.images - offline).abs().max().item() < 1e-4, name
        assert job.steps_done == 2 * spec.unet_calls
        if m is not None:
            assert torch.equal(job.images[:, m.bool()], image[m.bool()].expand(2, -1)), name


def test_the_engine_refuses_an_edit_without_its_inputs(tiny_unet: torch.nn.Module) -> None:
    engine = Engine(tiny_loaded_model(tiny_unet))
    with pytest.raises(ValueError, match="needs an input image"):
        engine.submit(Job(ImageRequest(0, 1, ChainSpec(5, strength=0.5)), timeout_s=5))
    with pytest.raises(ValueError, match="go together"):
        engine.submit(Job(ImageRequest(0, 1, ChainSpec(5, repaint=True), None, 0.0, EditInput.of(torch.zeros(1, 8, 8))), timeout_s=5))
    with pytest.raises(ValueError, match="model's images"):
        engine.submit(Job(ImageRequest(0, 1, ChainSpec(5, strength=0.5), None, 0.0, EditInput.of(torch.zeros(3, 8, 8))), timeout_s=5))
