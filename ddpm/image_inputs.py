"""Input images for editing (ddpm/editing.py) from PNG bytes: checked against the model's image shape
and mode, with errors that say what the model takes. The inverse of the PNGs ``ddpm.grid`` writes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

GREY_MODES = ("L", "LA", "1", "I", "I;16")
COLOUR_MODES = ("RGB", "RGBA")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_SIGNATURE = b"\x93NUMPY"  # an array client's input: float (C, H, W) in [0, 1], as the server's npy answers


class InputError(ValueError):
    """An input the model cannot take; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _array(field: str, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy input: (C, H, W) or (H, W) of a one-channel model, finite, in [0, 1]."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(field, f"{field} is not a readable .npy array ({type(exc).__name__})") from exc
    if array.ndim == 2 and shape[0] == 1:
        array = array[None]
    if tuple(array.shape) != tuple(shape) or not np.issubdtype(array.dtype, np.number):
        what = f"a {array.dtype} array of shape {tuple(array.shape)}"
        raise InputError(field, f"{field} is {what}; this model takes {tuple(shape)} in [0, 1]")
    array = array.astype(np.float64)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise InputError(field, f"{field} must hold finite values in [0, 1]")
    return array


def _open(field: str, data: bytes) -> Image.Image:
    if not data.startswith(PNG_SIGNATURE):
        raise InputError(field, f"{field} is not a PNG or a .npy array (only those are taken)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(field, f"{field} is not a readable PNG ({type(exc).__name__})") from exc
    return image


def _what_it_takes(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"this model takes {w}x{h} {'grey' if c == 1 else 'RGB'} PNGs"


def _check_size(field: str, image: Image.Image, shape: tuple[int, int, int]) -> None:
    _, h, w = shape
    if image.size != (w, h):
        raise InputError(field, f"{field} is {image.size[0]}x{image.size[1]} {image.mode}; {_what_it_takes(shape)}")


def _grey_as_colour(image: Image.Image) -> bool:
    """An RGB(A) image whose three colour channels are equal everywhere: grey, stored in colour."""
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def decode_image(field: str, data: bytes, shape: tuple[int, int, int]) -> tuple[torch.Tensor, np.ndarray | None]:
    """The image as (C, H, W) float32 in [-1, 1] (the inverse of the PNGs the server answers with), and
    its alpha channel where it has one."""
    if data.startswith(NPY_SIGNATURE):
        return torch.from_numpy((_array(field, data, shape) * 2.0 - 1.0).astype(np.float32)), None
    image = _open(field, data)
    _check_size(field, image, shape)
    modes = GREY_MODES if shape[0] == 1 else COLOUR_MODES
    if shape[0] == 1 and image.mode in COLOUR_MODES and _grey_as_colour(image):  # e.g. a browser canvas: RGBA, R = G = B
        image = image.convert("LA" if image.mode == "RGBA" else "L")
    if image.mode not in modes:
        raise InputError(field, f"{field} is a {image.mode} PNG; {_what_it_takes(shape)} (modes {', '.join(modes)})")
    alpha = np.asarray(image.getchannel("A")) if image.mode in ("LA", "RGBA") else None
    if image.mode in ("I", "I;16"):
        pixels = np.asarray(image, dtype=np.float64) / 257.0  # 16-bit grey
    else:
        pixels = np.asarray(image.convert("L" if shape[0] == 1 else "RGB"), dtype=np.float64)
    pixels = pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1)  # (C, H, W)
    return torch.from_numpy((pixels / 127.5 - 1.0).astype(np.float32)), alpha  # numpy: no torch op on a request thread


def decode_mask(field: str, data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """(C, H, W) float32, 1 where a pixel is known (kept): alpha > 0 (OpenAI: alpha 0 marks what to
    repaint), or for a mask without alpha, a grey value over half (black marks what to repaint)."""
    if data.startswith(NPY_SIGNATURE):  # 1 where known, 0 where to repaint
        return keep_mask(field, _array(field, data, shape) >= 0.5, shape, "no 0 in the array")
    image = _open(field, data)
    _check_size(field, image, shape)
    if "A" in image.getbands():
        keep = np.asarray(image.getchannel("A")) > 0
    else:
        keep = np.asarray(image.convert("L")) >= 128
    return keep_mask(field, keep, shape, "no transparent pixel, or no black one without alpha")


def keep_mask(field: str, keep: np.ndarray, shape: tuple[int, int, int], why: str) -> torch.Tensor:
    """``keep`` ((H, W) or (C, H, W), True where a pixel is known) as the (C, H, W) float32 mask the chain
    takes; a mask that keeps every pixel repaints nothing and is refused (``why`` says what was looked for)."""
    if keep.all():
        raise InputError(field, f"{field} marks nothing to repaint ({why})")
    return torch.from_numpy(np.broadcast_to(keep, shape).astype(np.float32))
