"""Images a chain ended in NaN or infinity: a U-Net that overflows its precision (fp16 most often) or weights that
diverged. Cast to 8 bits, NaN became 0: a black square, delivered as if it were an image. The server fails such a
request (500, ``service.engine.errors.NonFiniteImages``) and ``ddpm sample`` writes nothing; both name the images."""

from __future__ import annotations

import torch


def finite_rows(images: torch.Tensor) -> list[bool]:
    """For each image of a batch (B, ...), whether every value is finite (one pass, on whatever device holds them)."""
    return torch.isfinite(images).flatten(1).all(1).tolist()


def not_finite_message(images: list[int]) -> str:
    """Why images ``images`` (indices k of their seed) are refused, and what to change."""
    shown = ", ".join(map(str, images[:5])) + (", ..." if len(images) > 5 else "")
    return (f"the model's output was not finite (NaN or infinity) for image{'s' if len(images) > 1 else ''} {shown} of this seed: "
            "a U-Net that overflows its precision (fp16 most often: bf16 or fp32 instead) or weights that diverged")
