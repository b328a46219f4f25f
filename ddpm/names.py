"""Every name a request, a setting or a command line can give: samplers, timestep spacings, U-Net
precisions, compile settings and class labels as text.

Defined once, here, and imported by the maths (``ddpm.samplers``, ``ddpm.respace``, ``ddpm.precision``,
``ddpm.inference_compile``), the HTTP schema, the settings and the ``ddpm`` command; this module imports
nothing heavy, so ``ddpm --help`` and ``ddpm generate`` stay free of torch. ``tests/test_package_structure.py`` fails if a
copy of these lists appears elsewhere.
"""

from __future__ import annotations

import enum
import functools
import unicodedata
from typing import Literal, get_args


class Sampler(str, enum.Enum):
    """The samplers of ``ddpm.samplers``, one module each (each a coefficient table of the one fused step)."""

    DDPM = "ddpm"  # Algorithm 2 of Ho et al. 2020, ddpm.samplers.ancestral
    DDIM = "ddim"  # Song, Meng & Ermon 2021, ddpm.samplers.ddim
    DPM_SOLVER = "dpmsolver++"  # DPM-Solver++(2M), Lu et al. 2022, ddpm.samplers.dpm_solver
    SDE_DPM_SOLVER = "sde-dpmsolver++"  # SDE-DPM-Solver++(2M), ddpm.samplers.dpm_solver
    RESTART = "restart"  # restart sampling (Xu et al. 2023) on SDE-DPM-Solver++(2M), ddpm.samplers.restart


SAMPLERS: tuple[str, ...] = tuple(s.value for s in Sampler)
# the server's default where a request names none: restart sampling at 10 calls is within the real-vs-real
# spread of the 1000-step chain's quality (BENCHMARKS.md, samplers); an inpainting's: Algorithm 2's step
DEFAULT_SAMPLER = Sampler.RESTART.value
DEFAULT_INPAINTING_SAMPLER = Sampler.DDPM.value

# which S of the T timesteps a respaced chain keeps (ddpm.respace: Lin et al. 2024, Table 2)
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing")
# the CLI's and the server's default where the model names none: measured best for the fast samplers
# (BENCHMARKS.md, samplers: SDE-DPM-Solver++ at 50 steps FD 8.3 / confident 0.868 vs linspace 9.4 / 0.852)
DEFAULT_SPACING = "trailing"

# ``ddpm train --fit`` (ddpm/data.py): a folder's non-square image stretched to the square size, or its middle square cropped
FITS: tuple[str, ...] = ("stretch", "crop", "pad")


def is_colour(text: str) -> bool:
    """Whether ``text`` names a colour as Pillow reads one ("white", "#808080", "rgb(0, 0, 0)"): ``--background``."""
    from PIL import ImageColor

    try:
        ImageColor.getrgb(text)
    except ValueError:
        return False
    return True

# the same names as types, for pydantic (the schema and the settings): Literal[tuple] is Literal[*tuple]
SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]
SpacingName = Literal[SPACINGS]  # type: ignore[valid-type]

# the U-Net's precision (ddpm.precision: auto is bf16 where the device has it natively) and whether
# the hot path is torch.compile'd (ddpm.inference_compile)
PrecisionSetting = Literal["auto", "fp32", "bf16", "fp16"]
PRECISION_SETTINGS: tuple[str, ...] = get_args(PrecisionSetting)
CompileSetting = Literal["auto", "on", "off"]
COMPILE_SETTINGS: tuple[str, ...] = get_args(CompileSetting)

MAX_THREADS = 1024  # torch CPU threads a setting or --threads may ask for (machines with 384 exist): DDPM_THREADS=100000 segfaulted


BALANCED = "balanced"  # class_label: image k of the seed asks for class k mod the number of classes


def parse_class_labels(text: str | None) -> int | str | list[int | str] | None:
    """Class labels written as text (``--class-label``, a multipart form field): '7', 'seven', or '1,2,3'
    (one per image), kept as text: ``LoadedModel.labels`` reads each as a class name first, else digits as an index
    where the classes are not named by numbers (a model trained on folders ``3/``, ``5/``, ``7/`` has classes 0, 1, 2
    named "3", "5", "7": '5' is "5", and '1' no class)."""
    if text is None:
        return None
    values: list[int | str] = [v.strip() for v in text.split(",")]
    return values if "," in text else values[0]


@functools.lru_cache(maxsize=8)
def class_index(class_names: tuple[str, ...]) -> dict[str, int]:
    """Each class name to its index, and its composed form (Unicode NFC) to it too where that form is one class's only.
    A folder named on macOS is stored decomposed ("cafe" + U+0301): the model's class was "café" to the eye and
    "unknown class 'café'" to every client that typed it (composed, as keyboards and browsers send). Made once per
    model's classes (0.2 ms of normalising for 1,000 classes, at each request) and shared: not to be changed."""
    index = {name: i for i, name in enumerate(class_names)}
    composed: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        composed.setdefault(unicodedata.normalize("NFC", name), []).append(i)
    return {**{form: ids[0] for form, ids in composed.items() if len(ids) == 1}, **index}


def find_class(index: dict[str, int], label: str) -> int | None:
    """``label``'s class in ``class_index``'s map: by the name as given, else by its composed form."""
    found = index.get(label)
    return index.get(unicodedata.normalize("NFC", label)) if found is None else found


def is_text(value: str) -> bool:
    """No lone surrogate in ``value``: it encodes as UTF-8 (a file name's bytes that are not UTF-8, and a JSON "\\udce9"
    escape, reach Python as lone surrogates)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_name(name: str) -> str:
    """``name`` as text that encodes: a folder name's bytes that are not UTF-8 (a Latin-1 "\\xe9t\\xe9", which Python
    holds as lone surrogates) become backslash escapes. A class name is sent in every answer that names its class, and
    a lone surrogate there failed the answer's encoding: a 500 for each request."""
    if is_text(name):
        return name
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no byte's (a card's own "\ud800")
        return name.encode("utf-8", "backslashreplace").decode("ascii")
