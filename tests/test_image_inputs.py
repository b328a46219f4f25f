"""The input decoders take a stranger's bytes: whatever comes in, only ``InputError`` (the client's 4xx,
naming the field) comes out, and what a header declares is checked before anything is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddpm.image_inputs import InputError, decode_image, decode_mask, max_input_bytes

SHAPES = [(1, 28, 28), (3, 8, 8)]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, colour_type: int = 0) -> bytes:
    """A tiny PNG whose header declares width x height, with a few bytes of IDAT (the review's 69 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def real_png(shape: tuple[int, int, int] = (1, 28, 28), mode: str = "L") -> bytes:
    _, h, w = shape
    pixels = (np.arange(h * w * (1 if mode in ("L",) else len(mode))) % 251).astype(np.uint8)
    image = Image.fromarray(pixels.reshape(h, w) if mode == "L" else pixels.reshape(h, w, len(mode)), mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_with_split_idat(shape: tuple[int, int, int] = (1, 28, 28)) -> bytes:
    """A valid 28x28 PNG whose IDAT is split by a chunk of an unknown, invalid type (Pillow: SyntaxError)."""
    data = real_png(shape)
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    idat = data[start + 8 : start + 8 + length]
    half = len(idat) // 2
    middle = chunk(b"IDAT", idat[:half]) + chunk(b"\0\1\2\3", b"x") + chunk(b"IDAT", idat[half:])
    return data[:start] + middle + data[start + 12 + length :]


def npy_declaring(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    """A 128-byte .npy whose header declares ``shape`` (the review's (100000, 100000) float64: 80 GB)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (118 - len(header) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


HOSTILE = {
    "png 20000x20000 (decompression bomb)": png_declaring(20000, 20000),
    "png 100000x100000": png_declaring(100000, 100000),
    "png (2^31-1)x1": png_declaring(2**31 - 1, 1),
    "png 13000x13000 RGBA (under Pillow's bomb threshold)": png_declaring(13000, 13000, 6),
    "png with an IDAT split by a chunk of type 0123": png_with_split_idat(),
    "npy declaring (100000, 100000) float64": npy_declaring((100000, 100000)),
    "npy declaring an object array": npy_declaring((1, 28, 28), "|O"),
    "npy of the right shape, cut short": npy(np.zeros((1, 28, 28)))[:200],
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("decode", [decode_image, decode_mask])
def test_the_reviews_inputs_are_input_errors_naming_the_field(name: str, decode) -> None:  # type: ignore[no-untyped-def]
    assert len(HOSTILE[name]) < 3000
    with pytest.raises(InputError) as err:
        decode("image", HOSTILE[name], (1, 28, 28))
    assert err.value.field == "image"


def test_a_declared_size_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(InputError, match="20000x20000"):
        decode_image("mask", png_declaring(20000, 20000), (1, 28, 28))
    assert loads == []  # never decoded


def test_an_npy_header_is_refused_before_its_data_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load ran on a header that declares the wrong shape"))
    with pytest.raises(InputError, match=r"\(100000, 100000\)"):
        decode_image("image", npy_declaring((100000, 100000)), (1, 28, 28))


def test_good_inputs_still_decode() -> None:
    image, alpha = decode_image("image", real_png(), (1, 28, 28))
    assert image.shape == (1, 28, 28) and alpha is None
    array = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    from_npy, _ = decode_image("image", npy(array), (1, 28, 28))
    assert np.allclose(from_npy.numpy()[0], array * 2 - 1, atol=1e-6)
    assert decode_mask("mask", npy((array > 0.5).astype(np.float32)), (1, 28, 28)).sum() > 0


def test_a_16_bit_grey_mask_is_read_on_its_own_scale() -> None:
    """A 16-bit mask's levels were clipped at 255 (Pillow's convert("L")): every level from 128 of 65535 up was kept,
    so the mid-grey left half (30000: 0.46, under half) was not repainted. It now reads as its 8-bit copy does."""
    levels = np.full((28, 28), 60000, dtype=np.uint16)
    levels[:, :14] = 30000
    deep, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(levels).save(deep, "PNG")
    Image.fromarray(np.round(levels / 257).astype(np.uint8)).save(eight, "PNG")
    mask = decode_mask("mask", deep.getvalue(), (1, 28, 28))
    assert np.array_equal(mask.numpy(), decode_mask("mask", eight.getvalue(), (1, 28, 28)).numpy())
    assert mask[0, :, :14].sum() == 0 and mask[0, :, 14:].min() == 1
    image, _ = decode_image("image", deep.getvalue(), (1, 28, 28))
    assert np.allclose(image.numpy(), decode_image("image", eight.getvalue(), (1, 28, 28))[0].numpy(), atol=1 / 127.5)


def _encoded(image: Image.Image, file_format: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=file_format, **params)
    return buf.getvalue()


def _png(image: Image.Image, **params: object) -> bytes:
    return _encoded(image, "PNG", **params)


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation
    return exif


HOLE = np.zeros((28, 28), dtype=bool)
HOLE[:, 14:] = True  # the right half: what a mask below marks to repaint
WHITE_HOLE = np.where(HOLE, 255, 0).astype(np.uint8)  # white over the hole, black elsewhere


def test_transparency_in_every_form_png_has_marks_the_hole() -> None:
    """A mask's transparent pixels are read from an alpha channel, a palette's alpha (pngquant's output) and a tRNS
    colour key (one grey level or RGB colour is transparent: optipng writes a cut-out so). Pillow keeps the last two
    in ``info``, not in a band, and they were ignored: a mask whose white is its transparent colour was read by its grey
    levels, **the opaque black half repainted and the transparent half kept**; a palette mask was "marks nothing to
    repaint"."""
    opaque_elsewhere = np.where(HOLE, 0, 255).astype(np.uint8)
    cut_out = np.dstack([np.full((28, 28, 3), 200, np.uint8), opaque_elsewhere])
    forms = {
        "an alpha channel (LA)": _png(Image.fromarray(np.dstack([WHITE_HOLE, opaque_elsewhere]), "LA")),
        "a grey colour key (white)": _png(Image.fromarray(WHITE_HOLE, "L"), transparency=255),
        "an RGB colour key (white)": _png(Image.fromarray(np.dstack([WHITE_HOLE] * 3), "RGB"), transparency=(255, 255, 255)),
        "a 1-bit colour key (white)": _png(Image.fromarray(WHITE_HOLE, "L").convert("1"), transparency=1),
        "a 16-bit colour key (white)": _png(Image.fromarray(WHITE_HOLE.astype(np.uint16) * 257), transparency=65535),
        "a palette's alpha (pngquant)": _png(Image.fromarray(cut_out, "RGBA").quantize(4)),
    }
    for name, data in forms.items():
        assert np.array_equal(decode_mask("mask", data, (1, 28, 28))[0].numpy() == 0, HOLE), name
        _, alpha = decode_image("image", data, (1, 28, 28))  # the image's own transparency: OpenAI's edit without a mask
        assert alpha is not None and np.array_equal(alpha == 0, HOLE), name


def test_a_mask_whose_alpha_is_opaque_everywhere_marks_the_hole_black() -> None:
    """An editor that saves every PNG with alpha: an opaque black-and-white mask was refused ("marks nothing to repaint",
    its alpha read alone); its black pixels mark the hole, as in a mask without alpha."""
    black_hole = 255 - WHITE_HOLE
    data = _png(Image.fromarray(np.dstack([black_hole] * 3 + [np.full((28, 28), 255, np.uint8)]), "RGBA"))
    assert np.array_equal(decode_mask("mask", data, (1, 28, 28))[0].numpy() == 0, HOLE)


def test_a_palette_image_is_read_as_its_colours_and_a_grey_one_by_a_colour_model() -> None:
    """A palette PNG was refused ("is a P PNG"), the form size optimisers give; a grey PNG for an RGB model likewise."""
    grey = (np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28)
    as_grey, _ = decode_image("image", _png(Image.fromarray(grey, "L")), (1, 28, 28))
    as_palette, alpha = decode_image("image", _png(Image.fromarray(grey, "L").convert("P")), (1, 28, 28))
    assert alpha is None and np.array_equal(as_palette.numpy(), as_grey.numpy())
    assert np.allclose((as_grey.numpy()[0] + 1) * 127.5, grey, atol=1e-4)
    small = grey[:8, :8]
    colour, _ = decode_image("image", _png(Image.fromarray(small, "L")), (3, 8, 8))
    assert colour.shape == (3, 8, 8) and all(np.allclose((colour.numpy()[c] + 1) * 127.5, small, atol=1e-4) for c in range(3))
    with pytest.raises(InputError, match="red, green and blue differ"):
        decode_image("image", _png(Image.fromarray(np.dstack([grey, 255 - grey, grey]), "RGB").quantize(64)), (1, 28, 28))


@pytest.mark.parametrize("decode", [decode_image, decode_mask])
def test_an_uploads_exif_orientation_is_applied(decode) -> None:  # type: ignore[no-untyped-def]
    """A PNG may carry an EXIF block (eXIf) whose Orientation 6 says "turn 90 degrees clockwise to view", as a phone's
    photo does; training data was turned so (``ddpm.data``), uploads were read as stored, sideways."""
    stored = np.zeros((28, 28), np.uint8)
    stored[:14, :] = 255  # white top half, stored; the viewer sees it on the right
    data = _png(Image.fromarray(stored, "L"), exif=_orientation(6))
    shown = np.rot90(stored, k=-1)  # clockwise
    decoded = decode("image", data, (1, 28, 28))
    levels = decoded[0].numpy() if decode is decode_mask else (decoded[0].numpy()[0] + 1) * 127.5
    assert np.allclose(levels, shown / (1 if decode is decode_image else 255), atol=1e-4)


def test_jpeg_and_webp_uploads_are_read_as_openais_edits_take_them() -> None:
    """A JPEG (a phone's photo, EXIF-turned) or a WebP of the model's size: read (was "not a PNG or a .npy array");
    its size is checked from its header before anything is decoded; another format is still refused by name."""
    grey = (np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28)
    lossless, _ = decode_image("image", _encoded(Image.fromarray(np.dstack([grey] * 3), "RGB"), "WEBP", lossless=True), (1, 28, 28))
    assert np.allclose((lossless.numpy()[0] + 1) * 127.5, grey, atol=1e-4)
    photo, _ = decode_image("image", _encoded(Image.fromarray(grey, "L"), "JPEG", quality=95), (1, 28, 28))
    assert np.abs((photo.numpy()[0] + 1) * 127.5 - grey).mean() < 8
    mask = decode_mask("mask", _encoded(Image.fromarray(255 - WHITE_HOLE, "L"), "JPEG", quality=95), (1, 28, 28))
    assert np.array_equal(mask[0].numpy() == 0, HOLE)  # black marks the hole, as in a PNG without alpha
    with pytest.raises(InputError, match="is 5000x5000"):  # under Pillow's bomb threshold: the header's size, undecoded
        decode_image("image", _jpeg_declaring(5000, 5000), (1, 28, 28))
    with pytest.raises(InputError, match="declares over"):  # over it: Pillow's refusal, named
        decode_image("image", _jpeg_declaring(20000, 20000), (1, 28, 28))
    with pytest.raises(InputError, match=r"not a PNG, JPEG, WebP or \.npy array"):
        decode_image("image", _encoded(Image.fromarray(grey, "L"), "GIF"), (1, 28, 28))


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header (SOF0) is made to declare width x height."""
    data = bytearray(_encoded(Image.new("L", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_max_input_bytes_covers_the_largest_form_of_an_input() -> None:
    for shape in [(1, 28, 28), (3, 32, 32), (3, 256, 256)]:
        assert len(npy(np.zeros(shape))) <= max_input_bytes(shape)
        assert len(npy(np.zeros(shape[1:]))) <= max_input_bytes(shape)


SEEDS = [real_png(), real_png((1, 28, 28), "LA"), real_png((3, 8, 8), "RGBA"), png_with_split_idat(), npy(np.zeros((1, 28, 28))),
         npy(np.zeros((3, 8, 8), np.float32)),
         _png(Image.fromarray(WHITE_HOLE, "L"), transparency=255),  # a colour key
         _png(Image.fromarray(np.dstack([WHITE_HOLE] * 4), "RGBA").quantize(4)),  # a palette with alpha
         _png(Image.fromarray(WHITE_HOLE, "L"), exif=_orientation(6)),  # an EXIF block
         _encoded(Image.fromarray(WHITE_HOLE, "L"), "JPEG", exif=_orientation(6)),
         _encoded(Image.fromarray(np.dstack([WHITE_HOLE] * 3), "RGB"), "WEBP", lossless=True)]  # fmt: skip


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out if cut is None else out[: cut % (len(out) + 1)])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.none() | st.integers(0, 10_000),
    shape=st.sampled_from(SHAPES),
    as_mask=st.booleans(),
)
def test_mutated_pngs_and_npys_raise_nothing_but_input_errors(seed: bytes, edits, cut, shape, as_mask: bool) -> None:  # type: ignore[no-untyped-def]
    data = _mutate(seed, edits, cut)
    try:
        (decode_mask if as_mask else decode_image)("image", data, shape)
    except InputError as exc:
        assert exc.field == "image"


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\x93NUMPY", b""]), tail=st.binary(max_size=600))
def test_random_bytes_raise_nothing_but_input_errors(prefix: bytes, tail: bytes) -> None:
    try:
        decode_image("image", prefix + tail, (1, 28, 28))
    except InputError as exc:
        assert exc.field == "image"
