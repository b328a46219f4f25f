"""The forms in which an image file may hold its pixels that a reader must undo to see them as a viewer shows them:
turned by an EXIF Orientation, indexed by a palette, transparent in any of PNG's ways, grey stored in colour. Torch-free (the ``ddpm
generate`` client uses them too); read by the uploads (``ddpm.image_inputs``), the training data (``ddpm.data``) and
an input fitted to a model's size (``ddpm.input_fit``)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def palette_as_colours(image: Image.Image) -> Image.Image:
    """A palette image (an optimiser's output: pngquant, optipng) as its colours, RGBA where its palette has alpha (as a
    band: Pillow warns on converting such an image straight to L or RGB); any other image as it is."""
    if image.mode != "P":
        return image
    return image.convert("RGBA" if "transparency" in image.info else "RGB")


def grey_as_colour(image: Image.Image) -> bool:
    """An RGB(A) image whose three colour channels are equal everywhere: grey, stored in colour (as browsers write)."""
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation says, as every viewer shows it (a phone stores a portrait photo
    sideways; a PNG may carry the same block in eXIf); as stored where that block is damaged."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # Pillow's EXIF parser raises many kinds on a stranger's bytes
        return image


def transparency(image: Image.Image) -> np.ndarray | None:
    """(H, W) uint8 alpha in any form PNG has: an alpha channel, a palette's alpha, or a colour key (tRNS: one grey
    level or RGB colour that is transparent, as an optimiser such as pngquant or optipng writes a cut-out); None
    where the image has none. Pillow keeps the last two in ``info``, not in a band: reading ``getbands()`` alone
    repainted the opaque half of a mask whose transparent colour was white."""
    if "A" in image.getbands():
        return np.asarray(image.getchannel("A"))
    if "transparency" in image.info:
        return np.asarray(image.convert("RGBA").getchannel("A"))
    return None
