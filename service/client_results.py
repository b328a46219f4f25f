"""What a call of the client (``service.client``) gives back: a :class:`Generation`, or a :class:`ClientError` that says
what went wrong. Apart from the client, so that what builds on its answers (``service.generation_folder``) needs
nothing else of it."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EventHandler = Callable[[str, dict[str, Any]], None]  # a stream's events: (name, data)


class ClientError(RuntimeError):
    """Anything a call can fail with. ``status`` is the HTTP status where the server gave one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerError(ClientError):
    """The server answered with an error status (or a stream's error event) and this ``detail``; ``errors``: a 422's
    structured list (each ``{type, loc, msg, input}``, and ``ctx`` where it has numbers to act on)."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status}: {detail}", status)
        self.detail, self.errors = detail, errors or []

    def images_within_cost(self) -> int | None:
        """A request refused for its U-Net calls (DDPM_MAX_CALLS_PER_REQUEST): how many of its images one request may
        hold (at least 1; None for any other refusal, or where even one image costs more than the bound)."""
        ctx = self.errors[0].get("ctx") if self.status == 422 and len(self.errors) == 1 else None
        if not isinstance(ctx, dict) or not all(isinstance(ctx.get(k), int) and ctx[k] > 0 for k in ("bound", "calls_per_image")):
            return None
        return ctx["bound"] // ctx["calls_per_image"] or None


class BadAnswer(ClientError):
    """The server answered something this client cannot use (malformed, incomplete or too large)."""


class CallTimeout(ClientError):
    """The call's deadline (``timeout_s``) passed before a full answer."""


class Unreachable(ClientError):
    """No connection to the server (refused, reset, name not resolved), after the retries."""


@dataclass
class Generation:
    """A finished request: one PNG per image (k = 0..n-1) and the server's description of the chain."""

    pngs: list[bytes]
    meta: dict[str, Any] = field(default_factory=dict)  # seed, steps, sampler, eta, timestep_spacing, model, precision, cached, timings

    def array(self) -> np.ndarray:
        """(N, C, H, W) float32 in [0, 1]: the PNGs' 8-bit pixels / 255."""
        return (self.pixels().astype(np.float32) / 255.0).transpose(0, 3, 1, 2)

    def pixels(self) -> np.ndarray:
        """(N, H, W, C) uint8: the PNGs' pixels."""
        from PIL import Image

        images = [np.asarray(Image.open(io.BytesIO(png))) for png in self.pngs]
        return np.stack([im if im.ndim == 3 else im[..., None] for im in images])

    def save(self, path: str | Path, ncols: int | None = None) -> Path:
        """``.npy``: the array; otherwise a grid of the images, in the format the name says where Pillow knows
        it (.png, .jpg, .webp, ...), else PNG."""
        from ddpm.atomic_file import write_npy, write_picture  # whole or not at all, the file there before kept otherwise

        path = Path(path)
        if path.suffix == ".npy":
            write_npy(path, self.array())
            return path
        from ddpm.grid import file_format, tile

        write_picture(path, tile(self.pixels(), ncols), file_format(path.suffix) or "PNG")  # the PNGs' own pixels, no torch
        return path
