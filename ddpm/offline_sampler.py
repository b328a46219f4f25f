"""Offline sampling (``ddpm sample``, ``ddpm eval``, training's sample grids, the benchmarks): the engine's
own iteration (``ddpm.denoising_iteration`` over a ``ddpm.running_batch.RunningBatch``), run alone, every
row from the first iteration to the last. What the server computes for an image is what this computes:
there is no second implementation of the chain to keep in step with it.

Image i depends on its Philox key ``seeds[i]`` alone: x_T ~ N(0, I) and every z are drawn from it (counter
0 for x_T, the paper's t for z).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ddpm.chain import ChainSpec, EpsModel, StepFn, default_step_fn
from ddpm.chain_table_store import ChainTableStore
from ddpm.chain_tables_cache import ChainTablesCache
from ddpm.denoising_iteration import DenoisingIteration
from ddpm.editing import DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_N_SAMPLE
from ddpm.image_request import EditInput, ImageRequest
from ddpm.running_batch import Owner, RunningBatch
from ddpm.schedule import NoiseSchedule, VarianceType

__all__ = ["SampleProgress", "sample", "sample_chain", "sample_requests"]


@dataclass
class SampleProgress:
    step: int  # 1..K, U-Net calls done
    total: int
    x: torch.Tensor  # (B, C, H, W) after the step; x_0 after the last


def sample_requests(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    variance_type: VarianceType,
    owners: Sequence[Owner],
    seeds: torch.Tensor,
    shape: tuple[int, ...],
    *,
    device: torch.device | str = "cpu",
    step_fn: StepFn | None = None,
    num_classes: int = 0,
) -> Iterator[SampleProgress]:
    """Rows ``owners`` ((ImageRequest, image index) each: its chain, label, guidance and edit inputs) with
    Philox keys ``seeds`` (int64 bits, one per row), every chain of the same length; yields after every U-Net
    call. ``num_classes`` > 0: a class-conditional eps_theta(x, t, labels) with null label ``num_classes``."""
    device = torch.device(device)
    tables = ChainTablesCache(schedule, VarianceType(variance_type), device)
    owners = list(owners)
    calls = {request.chain.unet_calls for request, _ in owners}
    if len(calls) != 1:
        raise ValueError(f"the rows' chains differ in length ({sorted(calls)} calls): the engine serves mixed chains")
    (total,) = calls
    store = ChainTableStore(tables, device, initial_columns=total)
    batch = RunningBatch(len(owners), shape, store, device, conditional=num_classes > 0, null_label=num_classes)
    iteration = DenoisingIteration(SimpleNamespace(eps_model=eps_model), step_fn or default_step_fn())
    for request in dict.fromkeys(request for request, _ in owners):
        request.check_inputs(shape)
    seeds = seeds.to(device)
    batch.add(owners, iteration.start_x(batch, owners, seeds), seeds)
    for done in range(1, total + 1):
        inputs, eps = iteration.eps(batch)
        x, x0 = iteration.step(batch, batch.n, inputs, eps)
        batch.advance(x, x0)
        yield SampleProgress(step=done, total=total, x=x)


def sample_chain(
    model: EpsModel,
    schedule: NoiseSchedule,
    seeds: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    steps: int | None = None,
    variance_type: VarianceType = VarianceType.FIXED_SMALL,
    clip_denoised: bool = True,
    sampler: str = "ddpm",
    eta: float = 0.0,
    spacing: str = "linspace",
    steps_offset: int = 0,
    device: torch.device | str = "cpu",
    step_fn: StepFn | None = None,
    strength: float = 1.0,
    init_image: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    jump_length: int = DEFAULT_JUMP_LENGTH,
    jump_n_sample: int = DEFAULT_JUMP_N_SAMPLE,
) -> Iterator[SampleProgress]:
    """One chain (its settings as keywords: ``ChainSpec``'s) for a batch of images, one Philox key each, an
    unconditional eps_theta(x, t); yields after every U-Net call (``sample_requests``).

    Editing (ddpm/editing.py): ``init_image`` ((C, H, W) or one per image, in [-1, 1]) with ``strength``
    < 1 starts from it noised to the level of round(strength T) - 1 (SDEdit); with a ``mask`` (same shape,
    1 where a pixel is kept) the chain inpaints the rest (RePaint, resampling by ``jump_length`` and
    ``jump_n_sample``).
    """
    spec = ChainSpec(steps or schedule.num_timesteps, sampler, eta, clip_denoised, spacing, steps_offset, strength,
                     mask is not None, jump_length, jump_n_sample)  # fmt: skip
    if spec.edits and init_image is None:
        raise ValueError("strength < 1 or a mask needs an init_image")
    b = seeds.shape[0]
    if init_image is None:
        owners: list[Owner] = [(ImageRequest(0, b, spec), k) for k in range(b)]
    else:  # one request per image: each its own input (the cache's name of an input is the API's business)
        images = init_image.float().cpu().expand(b, *shape) if init_image.dim() == len(shape) else init_image.float().cpu()
        masks = None if mask is None else (mask.float().cpu().expand(b, *shape) if mask.dim() == len(shape) else mask.float().cpu())
        owners = [(ImageRequest(0, 1, spec, edit=EditInput("", images[k], None if masks is None else masks[k])), 0) for k in range(b)]
    return sample_requests(model, schedule, variance_type, owners, seeds, shape, device=device, step_fn=step_fn)


def sample(model: EpsModel, schedule: NoiseSchedule, seeds: torch.Tensor, shape: tuple[int, int, int], **kwargs: object) -> torch.Tensor:
    """Run the whole chain; returns x_0 of shape (B, C, H, W)."""
    x = None
    for progress in sample_chain(model, schedule, seeds, shape, **kwargs):  # type: ignore[arg-type]
        x = progress.x
    assert x is not None
    return x
