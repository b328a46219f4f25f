"""Facts about a loaded model that clients and operators ask for (``GET /info``): the weights'
SHA-256, the parameter count and the cost of one U-Net call."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_files(model_dir: Path) -> list[Path]:
    """Every weights file under a model directory, in a stable order."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 of the weights: the file's own hash when there is one weights file (what ``sha256sum``
    prints), else the hash of the lines ``<sha256>  <relative path>`` of each file."""
    files = weight_files(model_dir)
    if not files:
        return ""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(p)}  {p.relative_to(model_dir).as_posix()}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def weights_mtime(model_dir: Path) -> int | None:
    """When the newest weights file was written (Unix seconds), None when there is none."""
    return max((int(p.stat().st_mtime) for p in weight_files(model_dir)), default=None)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def flops_per_image_step(
    eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], image_shape: tuple[int, int, int], device: torch.device
) -> int:
    """Floating-point operations (a multiply-add is 2) of one U-Net call on one image, counted by
    PyTorch's FlopCounterMode over convolutions, matmuls and attention (elementwise work is not counted)."""
    x = torch.zeros((1, *image_shape), device=device)
    t = torch.zeros((1,), dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        eps_model(x, t)
    return int(counter.get_total_flops())
