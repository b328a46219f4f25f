"""OpenAI's ``output_format`` (png, jpeg, webp) and ``output_compression`` (jpeg's and webp's quality): the files an
answer's images are encoded as (``ddpm.grid.image_files``), and what its ETag names beside them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm.grid import OUTPUT_FORMATS, image_files
from service.api.errors import ApiError
from service.api.generation import JSON
from service.api.schemas import ImageForm, ImageGenerationRequest


@dataclass(frozen=True)
class OutputFormat:
    """OpenAI's output_format and output_compression: the images' files (ddpm.grid.image_files)."""

    name: str = "png"
    quality: int | None = None  # jpeg and webp: 0-100 (None: 100)

    def encode(self, images: torch.Tensor) -> list[bytes]:
        return image_files(images, self.name, self.quality)

    def media(self) -> str:
        """What the answer's ETag names beside its images (PNG answers keep theirs)."""
        return JSON if self.name == "png" else f"{JSON}; output_format={self.name}; output_compression={self.quality}"


def output_format_of(body: ImageGenerationRequest | ImageForm) -> OutputFormat:
    """The format a request's ``output_format`` and ``output_compression`` ask for (400 naming the parameter)."""
    name, quality = getattr(body, "output_format", None) or "png", getattr(body, "output_compression", None)
    if name not in OUTPUT_FORMATS:
        raise ApiError(400, f"output_format {name!r} is not supported (it takes {', '.join(OUTPUT_FORMATS)})",
                       param="output_format", code="unsupported_value")  # fmt: skip
    if quality is not None and name == "png":
        raise ApiError(400, "output_compression applies to jpeg and webp (output_format); png is lossless",
                       param="output_compression", code="unsupported_value")  # fmt: skip
    if quality is not None and not 0 <= quality <= 100:
        raise ApiError(400, f"output_compression must be in 0..100, got {quality}", param="output_compression")
    return OutputFormat(name, quality)
