"""What every caller holds of a loaded model: :class:`LoadedModel` (its eps_theta, schedule, image
shape, classes, and the chains it can run), whichever loader made it (``ddpm.model_source`` for a
ddpm-serve directory, ``ddpm.diffusers_source`` for a diffusers one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm.chain import ChainSpec, EpsModel
from ddpm.editing import DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_N_SAMPLE, sdedit_start
from ddpm.names import BALANCED, DEFAULT_SPACING, class_index, find_class
from ddpm.respace import spaced_timesteps
from ddpm.samplers import RULES, sampler_rule
from ddpm.schedule import NoiseSchedule, VarianceType


class ChainError(ValueError):
    """A chain this model cannot run; ``field`` names the request field (or CLI option) at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass
class LoadedModel:
    name: str
    eps_model: EpsModel
    module: torch.nn.Module
    schedule: NoiseSchedule
    variance_type: VarianceType
    clip_denoised: bool
    image_shape: tuple[int, int, int]  # (C, H, W)
    source: str  # "ddpm-serve" or "diffusers"
    info: dict[str, Any] = field(default_factory=dict)
    # how `steps` picks timesteps when a request does not say: a diffusers model's scheduler config says
    # (DDPMPipeline parity); None for ddpm-serve models, which then use DEFAULT_SPACING (ddpm.respace)
    timestep_spacing: str | None = None
    steps_offset: int = 0
    path: Path | None = None  # the directory it was loaded from (a hub model: its snapshot in the cache)
    # a class-conditional model: eps_model(x, t, y) with labels 0..num_classes-1 and the null label
    # num_classes; class_names[i] names label i; guidance_scale: the w its model card recommends
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    guidance_scale: float | None = None
    # a distilled student (ddpm.distill): the one chain it was trained for, {"sampler": "ddim", "steps": N,
    # "timestep_spacing": "trailing"}; None: any chain
    distilled_chain: dict[str, Any] | None = None
    prediction: str = "eps"  # what the U-Net outputs (ddpm.checkpoint.PREDICTIONS); eps_model always gives eps

    def own_chain(self, sampler: str | None, steps: int | None, spacing: str | None) -> tuple[str | None, int | None, str | None]:
        """A distilled model's chain fills what a request leaves out (others: unchanged; ``chain`` then
        refuses anything else)."""
        own = self.distilled_chain
        if own is None:
            return sampler, steps, spacing
        return sampler or own["sampler"], steps or own["steps"], spacing or own.get("timestep_spacing")

    def _check_distilled(self, sampler: str, steps: int, spacing: str, strength: float, repaint: bool, eta: float | None) -> None:
        own = self.distilled_chain
        if own is None:
            return
        name = f"{own['sampler']} at {own['steps']} {own.get('timestep_spacing', DEFAULT_SPACING)} steps"
        why = f"this model is distilled (ddpm distill) for one chain, {name}: its U-Net has learnt no other timesteps"
        if strength < 1.0 or repaint:
            raise ChainError(
                "strength" if strength < 1.0 else "mask", f"{why}, so it cannot edit an image (SDEdit and RePaint start mid-chain)"
            )
        checks = (("sampler", sampler, own["sampler"]), ("steps", steps, own["steps"]),
                  ("timestep_spacing", spacing, own.get("timestep_spacing", DEFAULT_SPACING)))  # fmt: skip
        for field_name, value, wanted in checks:
            if value != wanted:
                raise ChainError(field_name, f"{why}; {field_name} {value!r} is not {wanted!r} (leave it out to get the model's own)")
        if eta:
            raise ChainError("eta", f"{why}; eta must be 0")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def labels(
        self, class_label: int | str | list[int | str] | None, n: int, guidance_scale: float | None, first: int = 0
    ) -> tuple[tuple[int, ...] | None, float]:
        """The label of each of n images (k = first..first+n-1 of the seed) and the guidance scale w a request asks for:
        ``class_label`` one for all images or a list with one per image, by index or name, or ``balanced`` (image k:
        class k mod the number of classes, so image k's class does not depend on the request that asks for it); w
        defaults to the model card's (0 without one). (None, 0.0) for an unconditional request. Raises ChainError naming
        the field."""
        if class_label is None:
            if guidance_scale:
                raise ChainError("guidance_scale", "guidance_scale needs a class_label (guidance pulls towards a class)")
            return None, 0.0
        if not self.conditional:
            raise ChainError("class_label", "this model is unconditional: it takes no class_label")
        names = class_index(tuple(self.class_names))
        if class_label == BALANCED and BALANCED not in names:  # (a class named so is that class)
            class_label = [k % self.num_classes for k in range(first, first + n)]
        given = class_label if isinstance(class_label, list) else [class_label] * n
        if len(given) != n:
            raise ChainError("class_label", f"class_label has {len(given)} labels for {n} images (give one, or one per image)")
        numbered = bool(names) and all(name.isdecimal() for name in names)  # classes named by numbers: digits are names only
        labels = []
        for label in given:
            as_index = isinstance(label, str) and label.isdecimal() and label.isascii() and not numbered
            index = label if isinstance(label, int) else find_class(names, label)
            index = int(label) if index is None and as_index else index
            if index is not None and 0 <= index < self.num_classes:  # a JSON number is an index; text a name, else digits an index
                labels.append(index)
            else:
                known = ", ".join(self.class_names) if self.class_names else f"0..{self.num_classes - 1}"
                raise ChainError("class_label", f"unknown class {label!r} (this model's classes: {known})")
        w = (self.guidance_scale or 0.0) if guidance_scale is None else guidance_scale
        return tuple(labels), float(w)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def span(self, strength: float = 1.0) -> int:
        """The timesteps a chain of this strength runs over: T, or SDEdit's round(strength T)
        (``ddpm.editing.sdedit_start``); ChainError naming ``strength`` outside (0, 1]."""
        try:
            return sdedit_start(self.schedule.num_timesteps, strength)
        except ValueError as exc:
            raise ChainError("strength", str(exc)) from exc

    def chain(
        self,
        sampler: str,
        steps: int,
        eta: float | None = None,
        spacing: str | None = None,
        clip: bool | None = None,
        default_spacing: str = DEFAULT_SPACING,
        *,
        strength: float = 1.0,
        repaint: bool = False,
        jump_length: int | None = None,
        jump_n_sample: int | None = None,
    ) -> ChainSpec:
        """The chain a request (or ``ddpm sample``) asks for, with this model's defaults filled in: its
        clip setting, its own spacing and offset (a diffusers config's) or ``default_spacing``; an edit's
        strength (SDEdit) and resampling (RePaint, ``repaint``)."""
        t, span = self.schedule.num_timesteps, self.span(strength)
        if not 1 <= steps <= span:
            at = f" at strength {strength:g} (the model's T = {t})" if span < t else " (the model's T)"
            raise ChainError("steps", f"steps must be in 1..{span}{at}")
        if eta is not None and not 0 <= eta <= 1:  # NaN too
            raise ChainError("eta", f"eta must be in [0, 1], got {eta}")
        if eta is not None and not sampler_rule(sampler).takes_eta:
            takes = " or ".join(repr(name) for name, rule in RULES.items() if rule.takes_eta)
            raise ChainError("eta", f"eta applies to sampler {takes} only (this request's sampler is {sampler!r})")
        if not repaint and (jump_length is not None or jump_n_sample is not None):
            field = "jump_length" if jump_length is not None else "jump_n_sample"
            raise ChainError(field, "jump_length and jump_n_sample apply to inpainting (a mask) only")
        spacing = spacing or self.timestep_spacing or default_spacing
        offset = self.steps_offset if spacing == "leading" else 0
        try:
            spaced_timesteps(span, steps, spacing, offset)
        except ValueError as exc:
            raise ChainError("timestep_spacing", str(exc)) from exc
        clip = self.clip_denoised if clip is None else clip
        self._check_distilled(sampler, steps, spacing, strength, repaint, eta)
        try:
            return ChainSpec(steps, sampler, eta or 0.0, clip, spacing, offset, strength, repaint, jump_length or DEFAULT_JUMP_LENGTH,
                             jump_n_sample or DEFAULT_JUMP_N_SAMPLE)  # fmt: skip
        except ValueError as exc:  # strength out of range, a multistep sampler asked to inpaint
            raise ChainError("strength" if "strength" in str(exc) else "sampler", str(exc)) from exc
