"""Input images for editing (ddpm/editing.py) from PNG bytes (or JPEG, WebP, .npy): checked against the model's
image shape and mode, with errors that say what the model takes. The inverse of the PNGs ``ddpm.grid`` writes.

The bytes are a stranger's: every failure of a decoder is an ``InputError`` naming the field, never
anything else (tests/test_image_inputs.py feeds random and mutated PNG, APNG, JPEG, WebP and .npy bytes). What an
input declares is checked before anything is decoded or allocated: a PNG's size from its header (a
69-byte PNG may declare 20000x20000), a JPEG's or WebP's from the header Pillow reads before decoding, an .npy's
shape and dtype from its header (a 128-byte one may declare 80 GB).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image

from ddpm.image_forms import grey_as_colour, palette_as_colours, transparency, upright

GREY_MODES = ("L", "LA", "1", "I", "I;16")
COLOUR_MODES = ("RGB", "RGBA")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # JPEG and WebP: what OpenAI's edits take besides PNG (a phone's photo, a browser's export)
NPY_SIGNATURE = b"\x93NUMPY"  # an array client's input: float (C, H, W) in [0, 1], as the server's npy answers


MIN_INPUT_BYTES = 64 * 2**10  # room for a PNG's ancillary chunks (an ICC profile, text) at any model size


def max_input_bytes(shape: tuple[int, int, int]) -> int:
    """The most bytes one input (an image or a mask) of a model of ``shape`` can need: its largest form is
    a float64 .npy (8 bytes a value and a header); a PNG of the same pixels is smaller."""
    c, h, w = shape
    return max(MIN_INPUT_BYTES, 8 * c * h * w + 4096)


def base64_chars(n: int) -> int:
    """Characters of ``n`` bytes in base64."""
    return 4 * ((n + 2) // 3)


class InputError(ValueError):
    """An input the model cannot take; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _npy_header(field: str, data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy declares, read from its header alone (nothing allocated)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        declared, _, dtype = read(stream)
    except Exception as exc:  # a stranger's header: ValueError, SyntaxError, struct.error, ...
        raise InputError(field, f"{field} is not a readable .npy array ({type(exc).__name__})") from exc
    return tuple(declared), dtype


def _array(field: str, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy input: (C, H, W) or (H, W) of a one-channel model, real numbers, finite, in [0, 1]."""
    declared, dtype = _npy_header(field, data)
    fits = declared == tuple(shape) or (shape[0] == 1 and declared == tuple(shape[1:]))
    if not fits or dtype.kind not in "uif":  # checked before the data is read: the header may declare any size
        raise InputError(field, f"{field} is a {dtype} array of shape {declared}; this model takes {tuple(shape)} in [0, 1]")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # truncated data, a header that lied
        raise InputError(field, f"{field} is not a readable .npy array ({type(exc).__name__})") from exc
    array = array.reshape(shape).astype(np.float64)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise InputError(field, f"{field} must hold finite values in [0, 1]")
    return array


def _format(field: str, data: bytes) -> str:
    """The format the first bytes name: Pillow is handed that one alone (no guessing among its dozens of decoders)."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise InputError(field, f"{field} is not a PNG, JPEG, WebP or .npy array (only those are taken)")


def _open(field: str, data: bytes, shape: tuple[int, int, int]) -> Image.Image:
    """The image decoded, once its header says it has the model's size (a bomb is refused undecoded): PNG, or JPEG or
    WebP (the size from their headers as Pillow reads them, before anything is decoded)."""
    kind = _format(field, data)
    if kind == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":  # the first chunk's width and height, before Pillow
        width, height = struct.unpack(">II", data[16:24])
        _check_size(field, width, height, "", shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a stranger's damaged EXIF block or chunk: not a log line per request
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])  # reads the header only
            _check_size(field, image.size[0], image.size[1], f" {image.mode}", shape)
            image.load()
            image = upright(image)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # a JPEG's or WebP's header, read by Pillow: nothing decoded
        raise InputError(field, f"{field} declares over {Image.MAX_IMAGE_PIXELS} pixels; {_what_it_takes(shape)}") from exc
    except Exception as exc:  # Pillow raises many kinds on a damaged PNG: OSError, SyntaxError, EOFError, struct.error, ...
        raise InputError(field, f"{field} is not a readable {kind} ({type(exc).__name__})") from exc
    _check_size(field, image.size[0], image.size[1], f" {image.mode} (as its EXIF Orientation turns it)", shape)
    return palette_as_colours(image)


def _what_it_takes(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"this model takes {w}x{h} {'grey' if c == 1 else 'RGB (or grey)'} PNGs"


def _check_size(field: str, width: int, height: int, mode: str, shape: tuple[int, int, int]) -> None:
    _, h, w = shape
    if (width, height) != (w, h):
        raise InputError(field, f"{field} is {width}x{height}{mode}; {_what_it_takes(shape)}")


def decode_image(field: str, data: bytes, shape: tuple[int, int, int]) -> tuple[torch.Tensor, np.ndarray | None]:
    """The image as (C, H, W) float32 in [-1, 1] (the inverse of the PNGs the server answers with), and
    its alpha where it has any (``transparency``). A palette PNG is read as its colours; a grey one for a colour
    model as R = G = B; a colour one for a grey model only where R = G = B (e.g. a browser canvas's RGBA)."""
    if data.startswith(NPY_SIGNATURE):
        return torch.from_numpy((_array(field, data, shape) * 2.0 - 1.0).astype(np.float32)), None
    image = _open(field, data, shape)
    alpha = transparency(image)
    grey = image.mode in GREY_MODES
    if not grey and image.mode not in COLOUR_MODES:
        raise InputError(field, f"{field} is a {image.mode} PNG; {_what_it_takes(shape)}")
    if shape[0] == 1 and not grey:
        if not grey_as_colour(image):
            raise InputError(field, f"{field} is an {image.mode} PNG whose red, green and blue differ; {_what_it_takes(shape)}")
        grey = True
    if grey:  # grey_levels reads a colour image of R = G = B exactly: L = (299 R + 587 G + 114 B) / 1000
        pixels = np.broadcast_to(grey_levels(image), (shape[0], *image.size[::-1]))
    else:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64).transpose(2, 0, 1)  # (C, H, W)
    return torch.from_numpy((pixels / 127.5 - 1.0).astype(np.float32)), alpha  # numpy: no torch op on a request thread


def decode_mask(field: str, data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """(C, H, W) float32, 1 where a pixel is known (kept): transparent pixels (alpha 0, in any form PNG has:
    ``transparency``) are repainted (OpenAI's rule); in a mask with none, black ones (a grey value under half)."""
    if data.startswith(NPY_SIGNATURE):  # 1 where known, 0 where to repaint
        return keep_mask(field, _array(field, data, shape) >= 0.5, shape, "no 0 in the array")
    image = _open(field, data, shape)
    alpha = transparency(image)
    if alpha is not None and (alpha == 0).any():
        keep = alpha > 0
    else:  # no alpha, or an opaque one (an editor that saves every PNG with alpha): black marks the hole
        keep = grey_levels(image) >= 128
    return keep_mask(field, keep, shape, "no transparent pixel, nor a black one")


def deep_grey(image: Image.Image) -> bool:
    """A grey image of more than 8 bits (``grey_levels`` scales it): 16-bit (I;16, I;16B, I;16L), or mode I, as older
    Pillows open a 16-bit PNG."""
    return image.mode == "I" or image.mode.startswith("I;16")


def grey_levels(image: Image.Image) -> np.ndarray:
    """(H, W) grey levels on the 8-bit scale 0..255 (float64). A 16-bit image's levels are divided by 257: Pillow's
    convert("L") clips them at 255 instead, so a 16-bit mask's mid-grey (30000 of 65535) was kept, not repainted, and a
    folder of 16-bit PNGs trained on white squares (``ddpm.data``)."""
    if deep_grey(image):
        return np.asarray(image, dtype=np.float64) / 257.0
    return np.asarray(image.convert("L"), dtype=np.float64)


def keep_mask(field: str, keep: np.ndarray, shape: tuple[int, int, int], why: str) -> torch.Tensor:
    """``keep`` ((H, W) or (C, H, W), True where a pixel is known) as the (C, H, W) float32 mask the chain
    takes; a mask that keeps every pixel repaints nothing and is refused (``why`` says what was looked for)."""
    if keep.all():
        raise InputError(field, f"{field} marks nothing to repaint ({why})")
    return torch.from_numpy(np.broadcast_to(keep, shape).astype(np.float32))
