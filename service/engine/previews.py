"""Partial images while a chain runs (OpenAI's ``partial_images``, 1-3 a request).

Image k's preview i is the model's prediction of x_0 after ceil(calls (i + 1) / (P + 1)) of its U-Net calls,
Ho et al. Eq. 15 solved for x_0: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped where the chain
clips, with an inpainting's known pixels put back. It is taken between the step and the batch's advance from
the iteration's own x_t, eps and coefficients: no U-Net call of its own, and nothing at all while no running
job asks for previews (the engine keeps those apart). The final image is the chain's, unchanged: a preview
reads the batch, it writes nothing.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ddpm.running_batch import StepInputs, host_to_device
from service.engine.job import Job
from service.engine.served_batch import ServedBatch

MAX_PREVIEWS = 3  # OpenAI's bound on partial_images


@lru_cache(maxsize=1024)
def preview_after(calls: int, previews: int) -> dict[int, int]:
    """{calls done: preview index} of an image of ``calls`` U-Net calls: strictly before its last call, so a
    short chain gives fewer (one call: none), numbered from 0 in the order they come."""
    after = sorted({-(-calls * (i + 1) // (previews + 1)) for i in range(previews)} - {0, calls})
    return {done: index for index, done in enumerate(after)}


def wanted(batch: ServedBatch, m: int) -> list[tuple[int, Job, int, int]]:
    """(row, job, image k, preview index) of the rows among the m that advance whose image is due a preview
    after this iteration (a row at chain position p has done calls - p calls after it)."""
    rows = []
    for r in range(m):
        job, k = batch.owners[r]
        if job.previews and job.on_preview is not None and not job.done:
            index = preview_after(job.calls, job.previews).get(int(batch.calls_host[r] - batch.pos_host[r]))
            if index is not None:
                rows.append((r, job, k, index))
    return rows


def x0_hat(x: torch.Tensor, eps: torch.Tensor, inputs: StepInputs, rows: list[int]) -> torch.Tensor:
    """(len(rows), C, H, W) float32 on x's device: Eq. 15 for those rows of the iteration's x_t and eps (the engine
    copies them to the host as it copies finished images: on CUDA without a sync)."""
    idx = host_to_device(rows, x.device, torch.int64)
    shape = (-1, *([1] * (x.dim() - 1)))
    coefs = inputs.coefs
    x0 = coefs.x0_from_x[idx].view(shape) * x[idx] - coefs.x0_from_eps[idx].view(shape) * eps[idx].float()  # Eq. 15
    x0 = torch.where(coefs.clip[idx].view(shape) > 0, x0.clamp(-1.0, 1.0), x0)
    if inputs.edit is not None:  # inpainting: the known pixels are the input's (a row without a mask has masked 0)
        keep = inputs.edit.mask[idx] * inputs.edit.masked[idx].view(shape)
        x0 = keep * inputs.edit.known[idx] + (1.0 - keep) * x0
    return x0  # float32: x_t and the coefficients are, and eps is cast above
