"""An edit's input image or mask scaled to a model's size before it is sent or read (``--resize`` of ``ddpm generate``
and ``ddpm sample``), as the web page's editor does for what it loads: the server and ``ddpm.image_inputs`` take only
the model's size, which bounds an upload by it, so a photo is fitted on the user's side.

The image is turned upright (EXIF), cropped to the model's aspect ratio around its middle (not stretched), resampled
with Lanczos and made grey for a grey model (ITU-R 601 luma, Pillow's "L"); a mask keeps what marks its hole (fully
transparent pixels, or with no transparency its black ones) by nearest-neighbour resampling, so that the scaling makes
no pixel of it half transparent or grey. Torch-free: the ``ddpm generate`` client imports no torch.
"""

from __future__ import annotations

import io

from PIL import Image

from ddpm.image_forms import palette_as_colours, transparency, upright


def middle(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest region around the image's middle with the aspect ratio width:height (``ddpm train --fit crop``'s
    square too)."""
    w, h = image.size
    if w * height > h * width:  # wider than the model's images: the sides go
        side = h * width // height
        left = (w - side) // 2
        return image.crop((left, 0, left + side, h))
    side = w * height // width
    top = (h - side) // 2
    return image.crop((0, top, w, top + side))


def fitted_png(data: bytes, shape: tuple[int, int, int], mask: bool = False) -> bytes:
    """``data`` (any image Pillow reads) as a PNG of the model's ``shape`` (C, H, W): an input image (mode L or RGB), or
    with ``mask`` a mask (its alpha kept where it has any, as LA or RGBA; else grey). ValueError where it is not an
    image Pillow reads (said as the server would say it: the bytes are the user's own)."""
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = palette_as_colours(upright(opened))
            image.load()
    except Exception as exc:  # Pillow raises many kinds on a damaged file
        raise ValueError(f"not an image Pillow reads ({type(exc).__name__}: {exc})") from exc
    if mask:
        alpha = transparency(image)
        image = image.convert("L")
        if alpha is not None:  # LA: the hole kept as the file marked it
            image.putalpha(Image.fromarray(alpha))
        resample = Image.Resampling.NEAREST
    else:
        image = image.convert("L" if channels == 1 else "RGB")
        resample = Image.Resampling.LANCZOS
    if image.size != (width, height):
        image = middle(image, width, height).resize((width, height), resample)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
