"""An edit's input image and mask from a request: base64 PNGs (``/generate``), decoded and checked by
``ddpm.image_inputs``, and named by the SHA-256 of their pixels (the cache key, the ETag, the echo)."""

from __future__ import annotations

import base64
import binascii
import re

from ddpm.image_inputs import InputError, decode_image, decode_mask

__all__ = ["InputError", "b64_png", "decode_image", "decode_mask"]


DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)  # RFC 2397, e.g. canvas.toDataURL()
MIME_WHITESPACE = re.compile(rb"[\r\n\t ]+")  # RFC 2045 wraps base64 at 76 characters


def b64_png(field: str, text: str) -> bytes:
    """The bytes of a base64 field: plain base64, base64 wrapped in lines (MIME), or a ``data:`` URL of it."""
    try:
        prefix = DATA_URL.match(text, 0, 256)
        data = text[prefix.end() :] if prefix else text
        return base64.b64decode(MIME_WHITESPACE.sub(b"", data.encode("ascii")), validate=True)
    except (binascii.Error, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InputError(field, f"{field} is not base64 (nor a data: URL of base64)") from exc
