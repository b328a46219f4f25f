"""Where an eps_theta comes from: a ddpm-serve model directory or a local diffusers DDPM directory.

Both give a :class:`LoadedModel`, which is all the sampler and the server need.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ddpm.checkpoint import CONFIG, CheckpointError, load_model
from ddpm.loaded_model import LoadedModel
from ddpm.model_hub import model_name, resolve_model_dir
from ddpm.v_prediction import EpsFromV

Measured = TypeVar("Measured")


def _is_diffusers_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "scheduler_config.json").is_file() or (path / "scheduler").is_dir()


def load_model_source(spec: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load either format from a directory or a hub repository ``org/name[@revision]`` (ddpm.model_hub);
    raises CheckpointError with the reason when it is unusable."""
    path = resolve_model_dir(spec)
    model = _load_dir(path, device)
    model.name, model.path = model_name(spec), path
    return model


LOAD_TRIES = 3


def load_unchanged(
    spec: str | Path, device: torch.device | str, measure: Callable[[LoadedModel], Measured]
) -> tuple[LoadedModel, Measured]:
    """``load_model_source``, then ``measure`` of its files (the server: the weights' SHA-256 and the fingerprint that
    names its images in ETags and the response cache), with the directory's files the same (name, inode, size, mtime)
    before the load and after the measure: loaded and measured again where they changed. A training run exports into its
    model directory at each checkpoint, through a temporary file and a rename; between a server's load and its hash the
    hash could name weights it does not run. CheckpointError where the files changed in each of ``LOAD_TRIES``."""
    path = resolve_model_dir(spec)
    for _ in range(LOAD_TRIES):
        before = _file_states(path)
        model = _load_dir(path, device)
        model.name, model.path = model_name(spec), path
        measured = measure(model)
        if _file_states(path) == before:
            return model, measured
    raise CheckpointError(f"{path} changed while it was loaded, {LOAD_TRIES} times over (a run exporting into it every few "
                          "seconds?): serve a copy of it")  # fmt: skip


def _file_states(path: Path) -> dict[str, tuple[int, int, int]]:
    states = {}
    for p in sorted(path.rglob("*")):
        try:
            st = p.stat()
        except OSError:  # gone between the listing and the stat: a change
            states[p.as_posix()] = (-1, -1, -1)
            continue
        if not stat.S_ISDIR(st.st_mode):
            states[p.as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return states


def _load_dir(path: Path, device: torch.device | str) -> LoadedModel:
    if (path / CONFIG).is_file() and not _is_diffusers_dir(path):
        try:
            config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / CONFIG} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / CONFIG} holds a JSON {type(config).__name__}, not an object")
        fmt = config.get("format")
        if fmt is not None:
            module, card = load_model(path, device)
            schedule = card.schedule()
            if card.prediction == "v":  # a distilled student (ddpm.distill): the chain takes eps
                module = EpsFromV(module, schedule).to(device).eval()
            return LoadedModel(
                name=path.name,
                eps_model=module,
                module=module,
                schedule=schedule,
                variance_type=card.variance_type,
                clip_denoised=card.clip_denoised,
                image_shape=card.image_shape,
                source="ddpm-serve",
                info={"training": card.training, "quality": card.quality},
                num_classes=card.unet.num_classes,
                class_names=card.class_names or [str(i) for i in range(card.unet.num_classes)],
                guidance_scale=card.guidance_scale,
                distilled_chain=card.distilled_chain,
                prediction=card.prediction,
            )
    if _is_diffusers_dir(path):
        from ddpm.diffusers_source import load_diffusers_ddpm

        return load_diffusers_ddpm(path, device)
    raise CheckpointError(f"{path} is neither a ddpm-serve model (config.json + model.safetensors) nor a diffusers DDPM directory"
                          f"{_run_hint(path)}")  # fmt: skip


def _run_hint(path: Path) -> str:
    """A training or distillation run given where its model was meant (``--model runs/mine``): where the model is."""
    models = [p for p in (path / "model", *sorted(path.glob("steps_*"))) if (p / CONFIG).is_file()]
    return f" (a run directory: its model{'s are' if len(models) > 1 else ' is'} {', '.join(map(str, models))})" if models else ""
