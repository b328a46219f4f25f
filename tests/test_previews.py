"""Partial images (service/engine/previews.py) on the engine without HTTP: when they come, that each is Ho et al.'s
Eq. 15 of the chain's own x_t, computed here from the offline sampler's states, and that asking for them changes no
image."""

from __future__ import annotations

import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import EditInput, ImageRequest
from ddpm.offline_sampler import sample_requests
from ddpm.respace import spaced_timesteps
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.engine.engine import Engine
from service.engine.job import Job
from service.engine.previews import preview_after
from tests.engine_jobs import wait_done
from tests.tiny_model import random_tiny_unet, tiny_loaded_model

MODEL = tiny_loaded_model(random_tiny_unet())
HALF = torch.cat([torch.ones(1, 8, 4), torch.zeros(1, 8, 4)], dim=-1)  # the left half known, the right repainted
IMAGE = torch.linspace(-1, 1, 64).view(1, 8, 8)


def test_previews_come_strictly_before_the_last_call_and_fewer_on_a_short_chain() -> None:
    assert preview_after(8, 3) == {2: 0, 4: 1, 6: 2}
    assert preview_after(10, 1) == {5: 0}
    assert preview_after(2, 3) == {1: 0}  # ceil(0.5), ceil(1), ceil(1.5) = 1, 1, 2: one before the last call
    assert preview_after(1, 3) == {}


def _served(request: ImageRequest, previews: int) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """The request's images from an engine, and the previews it handed over: (image k, preview index, x0_hat)."""
    seen: list[tuple[int, int, torch.Tensor]] = []
    engine = Engine(MODEL, max_batch=4)
    engine.start()
    try:
        job = Job(request, timeout_s=120, previews=previews, on_preview=lambda _, k, i, image: seen.append((k, i, image)))
        wait_done(engine.submit(job), timeout=120)
    finally:
        engine.stop()
    assert job.error is None and job.images is not None
    return job.images, seen


def _offline_states(request: ImageRequest) -> list[torch.Tensor]:
    """x after 1, 2, ... calls of the offline sampler (the same chain, the same keys)."""
    seeds = seeds_to_tensor(image_seeds(request.seed, request.n, request.first))
    owners = [(request, k) for k in range(request.n)]
    with torch.inference_mode():
        return [p.x.clone() for p in sample_requests(MODEL.eps_model, MODEL.schedule, MODEL.variance_type, owners, seeds,
                                                     MODEL.image_shape)]  # fmt: skip


def test_each_preview_is_eq_15_of_the_chains_own_state_and_the_images_are_unchanged() -> None:
    request = ImageRequest(3, 2, ChainSpec(8, "ddim", spacing="trailing"))
    images, seen = _served(request, previews=3)
    plain, none = _served(request, previews=0)
    assert none == [] and torch.equal(images, plain)  # asking for previews changes no image
    assert sorted((k, i) for k, i, _ in seen) == [(k, i) for k in range(2) for i in range(3)]
    states = _offline_states(request)
    timesteps = spaced_timesteps(1000, 8, "trailing")[::-1]  # the order the calls run
    abar = torch.tensor(MODEL.schedule.alphas_cumprod, dtype=torch.float64)
    for k, i, image in seen:
        call = {0: 2, 1: 4, 2: 6}[i]  # the preview comes with the call'th U-Net call, from the x_t it read
        t = int(timesteps[call - 1])
        x_t = states[call - 2]  # both images, as the engine's call ran them (the same batch: the same kernels)
        with torch.inference_mode():
            eps = MODEL.eps_model(x_t, torch.tensor([t, t]))
        x0 = ((x_t - (1 - abar[t]).sqrt().float() * eps) / abar[t].sqrt().float()).clamp(-1, 1)  # Eq. 15, clipped as the chain clips
        assert torch.allclose(image, x0[k], atol=1e-4), (k, i)


def test_an_inpaintings_previews_keep_its_known_pixels() -> None:
    request = ImageRequest(7, 1, ChainSpec(6, "ddim", repaint=True, jump_length=2, jump_n_sample=2), edit=EditInput.of(IMAGE, HALF))
    images, seen = _served(request, previews=2)
    assert [i for _, i, _ in seen] == [0, 1]
    for _, _, image in seen:
        assert torch.equal(image[..., :4], IMAGE[..., :4]) and not torch.equal(image[..., 4:], IMAGE[..., 4:])
    assert torch.equal(images[0][..., :4], IMAGE[..., :4])
