"""An edit's input fitted to a model's size on the user's side (ddpm/input_fit.py, ``--resize``): the middle at the
model's aspect ratio (not stretched), grey for a grey model; a mask's hole kept exactly (no half-transparent or grey
pixel from the scaling)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ddpm.input_fit import fitted_png


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format="PNG")
    return out.getvalue()


def _read(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_an_image_is_its_middle_resampled_and_grey_for_a_grey_model() -> None:
    portrait = np.zeros((60, 20, 3), dtype=np.uint8)  # 20 wide, 60 high: a square model keeps rows 20..39
    portrait[:20] = (255, 0, 0)  # bands a stretch would bring in
    portrait[40:] = (0, 0, 255)
    portrait[20:40] = (100, 100, 100)
    grey = _read(fitted_png(_png(portrait), (1, 8, 8)))
    assert grey.mode == "L" and grey.size == (8, 8) and np.asarray(grey).tolist() == [[100] * 8] * 8
    colour = _read(fitted_png(_png(portrait), (3, 4, 8)))  # a 2:1 model: the middle 20x10 of the portrait
    assert colour.mode == "RGB" and colour.size == (8, 4) and (np.asarray(colour) == 100).all()
    red = np.zeros((30, 30, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert np.asarray(_read(fitted_png(_png(red), (1, 6, 6)))).tolist() == [[76] * 6] * 6  # ITU-R 601 luma: 0.299 x 255


def test_a_masks_hole_is_kept_exactly() -> None:
    rgba = np.full((40, 40, 4), 255, dtype=np.uint8)
    rgba[:20, :20, 3] = 0  # the top-left quarter is the hole
    fitted = _read(fitted_png(_png(rgba), (1, 8, 8), mask=True))
    alpha = np.asarray(fitted.getchannel("A"))
    assert fitted.mode == "LA" and set(np.unique(alpha)) == {0, 255}
    assert (alpha[:4, :4] == 0).all() and (alpha[4:, :] == 255).all() and (alpha[:, 4:] == 255).all()
    marks = np.full((30, 30), 255, dtype=np.uint8)
    marks[15:, 15:] = 0  # no alpha: black marks the hole
    fitted = _read(fitted_png(_png(marks), (3, 6, 6), mask=True))
    levels = np.asarray(fitted)
    assert fitted.mode == "L" and set(np.unique(levels)) == {0, 255} and (levels[3:, 3:] == 0).all() and levels[:3].min() == 255


def test_what_is_no_image_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an image Pillow reads"):
        fitted_png(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, (1, 8, 8))
