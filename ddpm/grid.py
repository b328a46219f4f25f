"""Images in [-1, 1] to PNG (JPEG or WebP where OpenAI's output_format asks): one image, or a grid of a batch."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # a tensor's caller has torch loaded; ``ddpm generate`` tiles PNG pixels without it (~2.5 s to import)
    import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding half to even, in float32 as the model's
    output is. In numpy, not torch: a server encodes on request threads, and one parallel torch op there
    (``round`` is one from ~2k values: a single 3x32x32 image) starts an OpenMP thread team that slows the engine's
    U-Net for the rest of the process (tests/test_torch_threads.py)."""
    import torch

    x = x.detach()
    if x.dtype != torch.float32 or x.device.type != "cpu":
        x = x.float().cpu()
    pixels = (np.clip(x.numpy(), -1, 1) + np.float32(1)) * np.float32(127.5)
    return np.rint(pixels).astype(np.uint8).transpose(0, 2, 3, 1)


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def make_grid(x: torch.Tensor, ncols: int | None = None, padding: int = 2) -> Image.Image:
    """A batch (B, C, H, W) in [-1, 1] laid out in a grid with ``padding`` pixels of black between images."""
    return tile(to_uint8(x), ncols, padding)


def tile(images: np.ndarray, ncols: int | None = None, padding: int = 2) -> Image.Image:
    """8-bit images (B, H, W, C) laid out in a grid with ``padding`` pixels of black between them."""
    b, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    canvas = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y0 : y0 + h, x0 : x0 + w] = im
    return _pil(canvas)


def file_format(suffix: str) -> str | None:
    """The Pillow format that writes a file name's ``suffix`` (".png", ".jpg", ".webp", ...); None where none
    does (an unknown suffix, or one Pillow only reads, as ".psd")."""
    Image.init()
    name = Image.registered_extensions().get(suffix.lower())
    return name if name in Image.SAVE else None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_pngs(x: torch.Tensor) -> list[bytes]:
    """One PNG per image of the batch."""
    return [png_bytes(_pil(a)) for a in to_uint8(x)]


OUTPUT_FORMATS = ("png", "jpeg", "webp")  # OpenAI's output_format


def image_files(x: torch.Tensor, output_format: str = "png", quality: int | None = None) -> list[bytes]:
    """One file per image of the batch: PNG (lossless), or JPEG or WebP at ``quality`` 0-100 (OpenAI's
    output_compression; default 100)."""
    if output_format == "png":
        return image_pngs(x)
    files = []
    for a in to_uint8(x):
        buf = io.BytesIO()
        _pil(a).save(buf, format=output_format.upper(), quality=100 if quality is None else quality)
        files.append(buf.getvalue())
    return files
