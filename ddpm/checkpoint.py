"""Model files: weights in safetensors plus a JSON config, validated on load.

A model directory holds ``model.safetensors`` (the EMA weights) and ``config.json``::

    {"format": "ddpm-serve/1", "unet": {...UNetConfig...},
     "schedule": {"kind": "linear", "num_timesteps": 1000, "params": {...}},
     "variance_type": "fixed_small", "clip_denoised": true, "image_shape": [C, H, W],
     "training": {...command, data, steps, seed...}, "quality": {...}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from ddpm.atomic_file import atomic_write as write_whole
from ddpm.atomic_file import write_text
from ddpm.names import text_name
from ddpm.schedule import NoiseSchedule, VarianceType, make_schedule
from ddpm.unet import UNet, UNetConfig

FORMAT = "ddpm-serve/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PREDICTIONS = ("eps", "v")


class CheckpointError(ValueError):
    """A model directory is missing, truncated, or does not match its config."""


@dataclass
class ModelCard:
    unet: UNetConfig
    schedule_kind: str = "linear"
    num_timesteps: int = 1000
    schedule_params: dict[str, float] = field(default_factory=dict)
    variance_type: VarianceType = VarianceType.FIXED_SMALL
    clip_denoised: bool = True
    # a class-conditional U-Net's class names, label i = class_names[i] (len = unet.num_classes), and the
    # guidance scale w its evaluation recommends (eps = (1 + w) eps(x, t, y) - w eps(x, t, null))
    class_names: list[str] = field(default_factory=list)
    guidance_scale: float | None = None
    # what the U-Net outputs: "eps" (Eq. 14's eps_theta) or "v" (v = alpha_t eps - sigma_t x_0, Salimans & Ho
    # 2022; a distilled student, ddpm.distill), and the one chain a distilled model was trained for
    # ({"sampler": "ddim", "steps": N, "timestep_spacing": "trailing"}; None: any chain)
    prediction: str = "eps"
    distilled_chain: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    def schedule(self) -> NoiseSchedule:
        return make_schedule(self.schedule_kind, self.num_timesteps, **self.schedule_params)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.unet.in_channels, self.unet.image_size, self.unet.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "unet": self.unet.to_dict(),
            "schedule": {"kind": self.schedule_kind, "num_timesteps": self.num_timesteps, "params": self.schedule_params},
            "variance_type": VarianceType(self.variance_type).value,
            "clip_denoised": self.clip_denoised,
            "image_shape": list(self.image_shape),
            **({"classes": self.class_names, "guidance_scale": self.guidance_scale} if self.unet.num_classes else {}),
            **({"prediction": self.prediction} if self.prediction != "eps" else {}),
            **({"distilled_chain": self.distilled_chain} if self.distilled_chain else {}),
            "training": self.training,
            "quality": self.quality,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        if not isinstance(d, dict):
            raise CheckpointError(f"a model config is a JSON object, not {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise CheckpointError(f"unsupported config format {d.get('format')!r}, expected {FORMAT!r}")
        for section in ("unet", "schedule"):
            if not isinstance(d.get(section), dict):
                raise CheckpointError(f"invalid model config: {section} must be a JSON object, got {d.get(section)!r}")
        variance, variances = d.get("variance_type", "fixed_small"), [v.value for v in VarianceType]
        if variance not in variances:
            raise CheckpointError(f"invalid model config: variance_type {variance!r} is not one of {', '.join(variances)}")
        if not isinstance(d.get("clip_denoised", True), bool):
            raise CheckpointError(f"invalid model config: clip_denoised must be true or false, got {d['clip_denoised']!r}")
        try:
            sched = d["schedule"]
            card = cls(
                unet=UNetConfig.from_dict(d["unet"]),
                schedule_kind=sched["kind"],
                num_timesteps=sched["num_timesteps"],
                schedule_params=dict(sched.get("params", {})),
                variance_type=VarianceType(variance),
                clip_denoised=d.get("clip_denoised", True),
                class_names=[str(c) for c in d.get("classes", [])],
                guidance_scale=None if d.get("guidance_scale") is None else float(d["guidance_scale"]),
                prediction=str(d.get("prediction", "eps")),
                distilled_chain=None if d.get("distilled_chain") is None else dict(d["distilled_chain"]),
                training=dict(d.get("training", {})),
                quality=dict(d.get("quality", {})),
            )
        except CheckpointError:
            raise
        except KeyError as exc:
            raise CheckpointError(f"invalid model config: no {exc} field") from exc
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model config: {exc}") from exc
        shape = d.get("image_shape", list(card.image_shape))  # written for readers; the U-Net's sizes decide
        if shape != list(card.image_shape):
            raise CheckpointError(f"invalid model config: image_shape {shape} is not the U-Net's {list(card.image_shape)} "
                                  f"(in_channels {card.unet.in_channels}, image_size {card.unet.image_size})")  # fmt: skip
        return card

    def __post_init__(self) -> None:
        try:  # what the schedule's fields make (a kind, a T, parameters), checked where the card is made
            self.schedule()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model config: schedule: {exc}") from exc
        self.class_names = names = [text_name(c) for c in self.class_names]  # a card's own "\udce9" too
        if names and (len(names) != self.unet.num_classes or len(set(names)) != len(names)):
            raise CheckpointError(f"classes {names} do not match num_classes = {self.unet.num_classes} (or repeat a name)")
        if self.prediction not in PREDICTIONS:
            raise CheckpointError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        chain = self.distilled_chain
        if chain is not None and (chain.get("sampler") != "ddim" or not isinstance(chain.get("steps"), int) or chain["steps"] < 1):
            raise CheckpointError(f"distilled_chain must name sampler ddim and steps >= 1, got {chain}")


def atomic_write(path: Path, write: Any) -> None:
    """``ddpm.atomic_file.atomic_write``, a safetensors writer's error among those it names."""
    write_whole(path, write, also=(SafetensorError,))


def save_model(directory: str | Path, model: UNet, card: ModelCard) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    text = json.dumps(card.to_dict(), indent=2) + "\n"
    write_text(directory / CONFIG, text)
    return directory


def read_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in model directory {Path(directory)}")
    try:
        return ModelCard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors. safetensors opens a path only where it is UTF-8 ("Path ... is not valid UTF-8",
    which read as a truncated file): under a folder with another name (a Latin-1 one) the file's bytes are read here."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return load(path.read_bytes())
    return load_file(path)


def load_model(directory: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, ModelCard]:
    """Load and validate a model directory; raises CheckpointError with the reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    card = read_card(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in model directory {directory}")
    try:
        state = read_weights(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is unreadable or truncated: {exc}") from exc
    with torch.device("meta"):  # the shapes the config makes, allocating nothing: a config of 4 million channels asked
        expected = UNet(card.unet).state_dict()  # for 256 TB before the comparison could say it does not match
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{weights}: {name} has shape {tuple(tensor.shape)}, config says {tuple(expected[name].shape)}")
        if expected[name].is_floating_point() and not tensor.is_floating_point():  # an int8 file was cast silently
            raise CheckpointError(f"{weights}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not floating point")
    check_finite(state.items(), weights)
    model = UNet(card.unet)
    model.load_state_dict(state)
    return model.to(device).eval(), card


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: Path) -> None:
    """Weights a model can run are finite: a run that diverged gives NaN weights, and every image of such a model is NaN
    (served, it was a black square with no error). Integer tensors (a buffer of indices) are left alone."""
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor{'s hold' if len(bad) > 1 else ' holds'} NaN or infinity ({bad[0]} first): "
                              "the training run diverged, or the file is damaged")  # fmt: skip


def record_quality(directory: str | Path, quality: dict[str, Any], *, measured: str | None = None) -> None:
    """Write a measured quality report into a model directory's config.json (the model card's numbers). ``measured``:
    the weights' ``model_facts.weights_sha256`` taken before the model was loaded for the measurement; weights changed
    since (a training run exporting into the directory) are refused: the card would give them another's quality."""
    from ddpm.model_facts import weights_sha256

    directory = Path(directory)
    if measured is not None and weights_sha256(directory) != measured:
        raise CheckpointError(f"{directory / WEIGHTS} changed while it was evaluated (a run exporting into {directory}?): the "
                              "report is of the weights before and is not recorded on the card; evaluate again when the run ends")
    card = read_card(directory)
    card.quality = quality
    text = json.dumps(card.to_dict(), indent=2) + "\n"
    write_text(directory / CONFIG, text)
