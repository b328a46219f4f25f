"""What a request asks for, made once (by the API, or by ``ddpm sample``) and carried unchanged down to
the rows of the running batch: ``n`` images of one seed over one chain, a class-conditional model's label
per image and guidance scale, an edit's input image and mask. The response cache's key and ETag are
derived from it (``service/response_cache.py``); how the request is served (priority, deadline, client)
is not part of it (``service.engine.job.Job``).

A new request field: a field here, and in the API's schema that fills it; if it changes the maths, a
field of ``ChainSpec`` (``ddpm/chain.py``) instead, which every table is built from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ddpm.chain import ChainSpec


@dataclass(frozen=True)
class EditInput:
    """An edit's input image and mask, named by the SHA-256 of their pixels (the tensors ride along,
    outside equality and hashing)."""

    sha256: str
    image: torch.Tensor = field(compare=False, repr=False)  # (C, H, W) float32 in [-1, 1]
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (C, H, W) float32, 1: known

    @staticmethod
    def of(image: torch.Tensor, mask: torch.Tensor | None = None) -> EditInput:
        """The input named by the SHA-256 of its pixels (float32 bytes; the mask's after them)."""
        digest = hashlib.sha256(image.numpy().tobytes())
        if mask is not None:
            digest.update(b"mask")
            digest.update(mask.numpy().tobytes())
        return EditInput(digest.hexdigest(), image, mask)


@dataclass(frozen=True)
class ImageRequest:
    """Images k = first..first+n-1 of seed ``seed`` over ``chain`` (image k's Philox key: ``ddpm.seeding.image_seeds``;
    image k is the same whichever request asks for it, so a large set can be asked for in parts)."""

    seed: int
    n: int
    chain: ChainSpec
    labels: tuple[int, ...] | None = None  # a class-conditional model's label per image (None: the null label)
    guidance_scale: float = 0.0  # classifier-free guidance w of every image (0: none, one U-Net row per step)
    edit: EditInput | None = None  # SDEdit starts from its image; RePaint keeps the pixels its mask marks
    first: int = 0  # the index k of the first image

    @property
    def rows_per_image(self) -> int:
        """U-Net rows an image takes in a call: 2 for a guided image (a null-label row too), else 1."""
        return 2 if self.guidance_scale else 1

    @property
    def row_calls(self) -> int:
        """U-Net row-calls per image: its chain's calls (RePaint's resampling included), twice for a guided
        image (a null-label row too)."""
        return self.chain.unet_calls * self.rows_per_image

    @property
    def cost(self) -> int:
        """What the request costs the U-Net: images x row-calls per image."""
        return self.n * self.row_calls

    def echoed(self) -> dict[str, object]:
        """What image k depends on besides the model and precision, as every answer says it (the server's
        ``chain_fields``, ``ddpm sample``'s folders): seed, the range's first image and the chain."""
        spec = self.chain
        return {
            "seed": self.seed,
            "first_image": self.first,
            "steps": spec.steps,
            "sampler": spec.sampler,
            "eta": spec.eta,
            "timestep_spacing": spec.spacing,
            "clip_denoised": spec.clip,
            "guidance_scale": self.guidance_scale,
            "strength": spec.strength,
            "jump_length": spec.jump_length if spec.repaint else None,
            "jump_n_sample": spec.jump_n_sample if spec.repaint else None,
            "input_sha256": None if self.edit is None else self.edit.sha256,
        }

    def check_inputs(self, shape: tuple[int, ...]) -> None:
        """The inputs the chain needs, of the model's image shape (ValueError otherwise)."""
        edit = self.edit
        if self.chain.edits and edit is None:
            raise ValueError("an editing chain (strength < 1 or a mask) needs an input image")
        if self.chain.repaint != (edit is not None and edit.mask is not None):
            raise ValueError("a mask and a RePaint chain go together")
        if self.labels is not None and len(self.labels) != self.n:
            raise ValueError(f"{len(self.labels)} labels for {self.n} images")
        for name, t in (("input image", None if edit is None else edit.image), ("mask", None if edit is None else edit.mask)):
            if t is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"the {name} is {tuple(t.shape)}, the model's images are {tuple(shape)}")
