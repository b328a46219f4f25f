"""Offline = served by construction: ``ddpm sample``'s sampler (``ddpm.offline_sampler``) and the engine run
the same iteration (``ddpm.denoising_iteration`` over a ``RunningBatch``), so a request alone in the engine
gives the offline sampler's images bit for bit (the same rows in the same batch: not even batched rounding
differs), for every kind of chain: each sampler, clipping, RePaint, SDEdit, classifier-free guidance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import EditInput, ImageRequest
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample_requests
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.engine.engine import Engine
from service.engine.job import Job
from tests.engine_jobs import wait_done
from tests.tiny_model import random_tiny_unet, save_tiny_conditional_model, tiny_loaded_model

SHAPE = (1, 8, 8)
HALF = torch.cat([torch.ones(1, 8, 4), torch.zeros(1, 8, 4)], dim=-1)  # the right half repainted
IMAGE = torch.linspace(-1, 1, 64).view(SHAPE)

REQUESTS = {
    "ddpm": ImageRequest(1, 3, ChainSpec(12, "ddpm")),
    "ddpm, no clip": ImageRequest(2, 2, ChainSpec(9, "ddpm", clip=False)),
    "ddim eta 0.5": ImageRequest(3, 3, ChainSpec(8, "ddim", eta=0.5, spacing="trailing")),
    "dpmsolver++": ImageRequest(4, 2, ChainSpec(7, "dpmsolver++", spacing="trailing")),
    "sde-dpmsolver++": ImageRequest(5, 2, ChainSpec(6, "sde-dpmsolver++", spacing="trailing")),
    "restart": ImageRequest(6, 3, ChainSpec(10, "restart", spacing="trailing")),
    "repaint": ImageRequest(7, 2, ChainSpec(6, "ddim", repaint=True, jump_length=2, jump_n_sample=2), edit=EditInput.of(IMAGE, HALF)),
    "sdedit": ImageRequest(8, 2, ChainSpec(5, "ddpm", strength=0.5), edit=EditInput.of(IMAGE)),
    "images 5 and 6": ImageRequest(12, 2, ChainSpec(6, "dpmsolver++", spacing="trailing"), first=5),  # first_image
}


def _served(model, request: ImageRequest) -> torch.Tensor:  # type: ignore[no-untyped-def]
    engine = Engine(model, max_batch=request.n)
    engine.start()
    try:
        job = engine.submit(Job(request, timeout_s=120))
        wait_done(job, timeout=120)
    finally:
        engine.stop()
    assert job.error is None and job.images is not None
    return job.images


def _offline(model, request: ImageRequest) -> torch.Tensor:  # type: ignore[no-untyped-def]
    seeds = seeds_to_tensor(image_seeds(request.seed, request.n, request.first))
    owners = [(request, k) for k in range(request.n)]
    x = None
    with torch.inference_mode():
        for progress in sample_requests(model.eps_model, model.schedule, model.variance_type, owners, seeds, model.image_shape,
                                        num_classes=model.num_classes):  # fmt: skip
            x = progress.x
    assert x is not None
    return x


@pytest.mark.parametrize("name", list(REQUESTS))
def test_a_request_alone_in_the_engine_is_the_offline_samplers_bit_for_bit(name: str) -> None:
    model = tiny_loaded_model(random_tiny_unet())
    request = REQUESTS[name]
    assert torch.equal(_served(model, request), _offline(model, request)), name


def test_guided_and_labelled_images_are_the_offline_samplers_bit_for_bit(tmp_path: Path) -> None:
    model = load_model_source(str(save_tiny_conditional_model(tmp_path / "cond", num_timesteps=100)), "cpu")
    for request in (ImageRequest(9, 3, ChainSpec(6, "dpmsolver++"), labels=(0, 2, 1), guidance_scale=2.0),
                    ImageRequest(10, 2, ChainSpec(5, "ddpm"), labels=(1, 1)),  # labels, no guidance
                    ImageRequest(11, 2, ChainSpec(5, "ddpm"))):  # fmt: skip  # neither: the null label
        assert torch.equal(_served(model, request), _offline(model, request)), request
