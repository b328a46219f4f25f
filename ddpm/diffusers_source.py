"""A local HuggingFace diffusers DDPM directory as a model source.

Layouts accepted: a pipeline directory (``unet/`` + ``scheduler/scheduler_config.json``, as the
paper's CIFAR-10 / CelebA-HQ / LSUN weights are published) or a flat one (``config.json`` of a
``UNet2DModel`` beside ``scheduler_config.json``). Only the schedule and eps-prediction that the
paper uses are accepted; anything else fails with a clear error instead of sampling garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddpm.checkpoint import CheckpointError, check_finite
from ddpm.loaded_model import LoadedModel
from ddpm.respace import SPACINGS
from ddpm.schedule import NoiseSchedule, VarianceType, make_schedule


def schedule_from_scheduler_config(cfg: dict) -> tuple[NoiseSchedule, VarianceType, bool]:
    """Our schedule, variance type and clip flag from a DDPMScheduler config dict."""
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"prediction_type {cfg.get('prediction_type')!r} is not supported (only 'epsilon')")
    if cfg.get("trained_betas") is not None:
        raise CheckpointError("trained_betas are not supported")
    if cfg.get("thresholding"):
        raise CheckpointError("dynamic thresholding is not supported")
    if cfg.get("rescale_betas_zero_snr"):  # diffusers rescales the betas (up to ~0.98 at t = T); refused, not ignored
        raise CheckpointError("rescale_betas_zero_snr is not supported (the betas would differ from diffusers')")
    t = cfg.get("num_train_timesteps", 1000)  # checked by make_schedule, as every number here
    kind = cfg.get("beta_schedule", "linear")
    if kind == "linear":
        schedule = make_schedule("linear", t, beta_start=cfg.get("beta_start", 1e-4), beta_end=cfg.get("beta_end", 0.02))
    elif kind == "squaredcos_cap_v2":
        schedule = make_schedule("cosine", t)
    else:
        raise CheckpointError(f"beta_schedule {kind!r} is not supported (linear, squaredcos_cap_v2)")
    variance = cfg.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large"):
        raise CheckpointError(f"variance_type {variance!r} is not supported (fixed_small, fixed_large)")
    clip = bool(cfg.get("clip_sample", True))
    if clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise CheckpointError("clip_sample_range other than 1.0 is not supported")
    return schedule, VarianceType(variance), clip


def spacing_from_scheduler_config(cfg: dict) -> tuple[str, int]:
    """``timestep_spacing`` and ``steps_offset`` as DDPMPipeline(num_inference_steps=S) uses them (diffusers'
    defaults: leading, 0), so ``steps=S`` visits the same timesteps."""
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise CheckpointError(f"timestep_spacing {spacing!r} is not supported ({', '.join(SPACINGS)})")
    offset = cfg.get("steps_offset", 0)
    if not isinstance(offset, int) or offset < 0:
        raise CheckpointError(f"steps_offset must be a non-negative integer, got {offset!r}")
    return spacing, offset


def load_diffusers_ddpm(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:
        raise CheckpointError("loading a diffusers directory needs the diffusers package (pip install diffusers)") from exc
    path = Path(path)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        sched_file = path / "scheduler_config.json"
    if not sched_file.is_file():
        raise CheckpointError(f"no scheduler_config.json under {path}")
    try:
        sched_cfg = json.loads(sched_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{sched_file} is not valid JSON: {exc}") from exc
    if not isinstance(sched_cfg, dict):
        raise CheckpointError(f"{sched_file} holds a JSON {type(sched_cfg).__name__}, not an object")
    try:
        schedule, variance, clip = schedule_from_scheduler_config(sched_cfg)
        spacing, offset = spacing_from_scheduler_config(sched_cfg)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:  # a T, a beta, a range the schedule refuses: the file and why, not a traceback
        raise CheckpointError(f"{sched_file}: {exc}") from exc
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the UNet2DModel in {unet_dir}: {exc}") from exc
    check_finite(unet.state_dict().items(), unet_dir)
    class_names = _class_names(path, unet.config, unet_dir)
    unet = unet.to(device).eval()

    def eps_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if class_names and y is None:
            y = torch.full_like(t, len(class_names))  # the null label
        return unet(x, t, class_labels=y).sample

    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return LoadedModel(
        name=path.name,
        eps_model=eps_model,
        module=unet,
        schedule=schedule,
        variance_type=variance,
        clip_denoised=clip,
        image_shape=(int(unet.config.in_channels), int(size), int(size)),
        source="diffusers",
        info={"scheduler_config": sched_cfg},
        timestep_spacing=spacing,
        steps_offset=offset,
        num_classes=len(class_names),
        class_names=class_names,
    )


def _class_names(path: Path, config: object, unet_dir: Path) -> list[str]:
    """A class-conditional UNet2DModel's class names, where the mapping is unambiguous: ``num_class_embeds``
    = K + 1 with ``model_index.json`` naming the K classes in ``id2label`` (as DiTPipeline does) and the
    last embedding the null label (DiT's convention for classifier-free guidance). [] for an unconditional
    U-Net. Anything else would be a guess, so it is refused."""
    num, kind = getattr(config, "num_class_embeds", None), getattr(config, "class_embed_type", None)
    if not num and not kind:
        return []
    index_file = path / "model_index.json"
    try:
        id2label = json.loads(index_file.read_text(encoding="utf-8")).get("id2label") if index_file.is_file() else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_file} is not valid JSON: {exc}") from exc
    try:
        labels = sorted(int(k) for k in id2label) if isinstance(id2label, dict) else None
    except (TypeError, ValueError):
        labels = None
    if kind is not None or labels is None or labels != list(range((num or 0) - 1)):
        raise CheckpointError(
            f"{unet_dir}: a class-conditional UNet2DModel is served only with num_class_embeds = K + 1 (the last one the null "
            f"label) and model_index.json's id2label naming labels 0..K-1; this one has num_class_embeds={num}, "
            f"class_embed_type={kind!r} and {'no' if not isinstance(id2label, dict) else len(id2label)} id2label entries"
        )
    names = {int(k): str(v) for k, v in id2label.items()}  # type: ignore[union-attr]
    return [names[i] for i in range(num - 1)]
