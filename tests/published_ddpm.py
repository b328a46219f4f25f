"""The shape of a published DDPM, google/ddpm-cifar10-32 (the paper's CIFAR-10 model as diffusers
publishes it), with random weights: our machines cannot fetch the real ones. The configs are the
published ``unet/config.json``, ``scheduler/scheduler_config.json`` and ``model_index.json``; the
U-Net they build has 35.7M parameters, as the model card says. Also: a Hugging Face hub cache laid
out by hand, as ``huggingface_hub`` writes it, so that ``--model org/name[@revision]`` is tested offline.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

REPO_ID = "google/ddpm-cifar10-32"
UNET_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}


def save_cifar10_shaped_pipeline(directory: Path, seed: int = 0) -> Path:
    """A diffusers pipeline directory of google/ddpm-cifar10-32's shape, random weights (seeded)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    config = {k: v for k, v in UNET_CONFIG.items() if not k.startswith("_")}
    UNet2DModel(**config).save_pretrained(directory / "unet")
    unet_config = directory / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "_diffusers_version": "0.0.4"}, indent=2))
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return directory


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path, commit: str | None = None, refs: tuple[str, ...] = ("main",)) -> str:
    """Copy ``source`` into ``cache`` (an HF_HUB_CACHE) as huggingface_hub stores a download of
    ``repo_id``: files as blobs named by their hash, a snapshot of symlinks per commit, and refs
    naming the commit. Returns the commit hash."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = commit or hashlib.sha1("".join(p.relative_to(source).as_posix() for p in files).encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = repo / "snapshots" / commit / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(path.relative_to(source).parts) - 1) + "../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit
