"""An edit's input image and mask from a request: base64 PNGs (``/generate``), decoded and checked by
``ddpm.image_inputs``, and named by the SHA-256 of their pixels (the cache key, the ETag, the echo)."""

from __future__ import annotations

import base64
import binascii
import hashlib

import torch

from ddpm.image_inputs import InputError, decode_image, decode_mask
from service.response_cache import EditInput

__all__ = ["InputError", "b64_png", "decode_image", "decode_mask", "edit_input"]


def b64_png(field: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(field, f"{field} is not base64") from exc


def edit_input(image: torch.Tensor, mask: torch.Tensor | None) -> EditInput:
    """The input named by the SHA-256 of its pixels (float32 bytes; the mask's after them)."""
    digest = hashlib.sha256(image.numpy().tobytes())
    if mask is not None:
        digest.update(b"mask")
        digest.update(mask.numpy().tobytes())
    return EditInput(digest.hexdigest(), image, mask)
