"""Classifier-free guidance (Ho & Salimans 2022) over a batch where every sample has its own label
and guidance scale w, in ONE U-Net call:

    eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t, null)        (CFG, Eq. 6 of the paper)

A sample with w = 0 costs one row of the call (its conditional eps, or the unconditional one for
y = null); a sample with w != 0 costs two: its conditional row and a null-label copy appended after
the batch. The combination runs before the fused step, which then sees a plain eps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ConditionalEps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, y) -> eps


def guided_eps(
    eps_model: ConditionalEps, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor, null_label: int
) -> torch.Tensor:
    """eps for every row: x (B, C, H, W), t and labels (B,) int64, scales (B,) float32 (w per row).

    Which rows are guided decides the call's shape, so it is read on the host: scales given as a CPU
    tensor (the engine's) cost no device synchronisation, and what goes to the device goes from pinned
    memory without waiting (on CUDA)."""
    host = scales.cpu()
    rows = torch.nonzero(host != 0).squeeze(1)
    if rows.numel() == 0:
        return eps_model(x, t, labels)
    guided, w = _to(rows, x.device), _to(host[rows], x.device)
    b = x.shape[0]
    null = torch.full((guided.numel(),), null_label, dtype=labels.dtype, device=labels.device)
    eps_all = eps_model(torch.cat([x, x[guided]]), torch.cat([t, t[guided]]), torch.cat([labels, null]))
    eps, eps_null = eps_all[:b], eps_all[b:]
    w = w.to(eps.dtype).view(-1, *([1] * (x.dim() - 1)))
    return eps.index_copy(0, guided, (1 + w) * eps[guided] - w * eps_null)  # CFG Eq. 6


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, without waiting for the device's queue (pinned and non-blocking on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def rows_per_call(scales: torch.Tensor) -> int:
    """U-Net rows a batch with these scales costs: 1 per sample plus 1 per guided sample."""
    return int(scales.numel() + (scales != 0).sum())


def fixed_guidance(eps_model: ConditionalEps, labels: torch.Tensor, scales: torch.Tensor, null_label: int) -> Callable[..., torch.Tensor]:
    """An eps_theta(x_t, t) for a fixed batch (the offline sampler's): ``guided_eps`` with these labels and scales."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(eps_model, x, t, labels, scales, null_label)

    return eps
