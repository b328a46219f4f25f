"""The tiny U-Net most tests and the load test run on (no side effects on import, unlike conftest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ddpm.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
# one level, no attention: the fewest kernels for a cold inductor compile (20 g++ runs against TINY's 28: `ddpm
# compile-cache` 52 s against 64 s, 2-core EPYC), for the tests that compile cold and check the machinery, not the net
SMALLEST = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)


def random_tiny_unet(config: UNetConfig = TINY) -> UNet:
    """The tiny U-Net, seeded, with its zero-initialised output layers randomised so eps is not 0."""
    torch.manual_seed(0)
    model = UNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def save_tiny_model(directory: Path, num_timesteps: int = 1000, config: UNetConfig = TINY) -> Path:
    """A ddpm-serve model directory holding ``random_tiny_unet(config)``, for servers in tests."""
    from ddpm.checkpoint import ModelCard, save_model

    return save_model(directory, random_tiny_unet(config), ModelCard(unet=config, num_timesteps=num_timesteps))


def tiny_loaded_model(unet: UNet, num_timesteps: int = 1000):  # type: ignore[no-untyped-def]
    """A LoadedModel around a tiny U-Net, as the server would hold it."""
    from ddpm.loaded_model import LoadedModel
    from ddpm.schedule import VarianceType, make_schedule

    return LoadedModel(
        name="tiny",
        eps_model=unet,
        module=unet,
        schedule=make_schedule("linear", num_timesteps),
        variance_type=VarianceType.FIXED_SMALL,
        clip_denoised=True,
        image_shape=(TINY.in_channels, TINY.image_size, TINY.image_size),
        source="test",
    )


TINY_CLASSES = ["cat", "dog", "fox"]


def random_tiny_conditional_unet() -> UNet:
    """A class-conditional tiny U-Net (3 classes + the null label), with label embeddings large enough
    that every label, and the null label, gives a different eps."""
    from dataclasses import replace

    torch.manual_seed(1)
    model = UNet(replace(TINY, num_classes=len(TINY_CLASSES))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
        model.label_emb.weight.normal_(0, 1.0)  # type: ignore[union-attr]
    return model


def save_tiny_conditional_model(directory: Path, num_timesteps: int = 1000, guidance_scale: float | None = 1.5) -> Path:
    from ddpm.checkpoint import ModelCard, save_model

    unet = random_tiny_conditional_unet()
    card = ModelCard(unet=unet.config, num_timesteps=num_timesteps, class_names=list(TINY_CLASSES), guidance_scale=guidance_scale)
    return save_model(directory, unet, card)


def copy_model_with(source: Path, target: Path, **config_changes: object) -> Path:
    """A copy of a ddpm-serve model directory whose config.json has ``config_changes`` applied
    (``schedule__params__beta_end=0.03``: a double underscore walks into nested objects)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for dotted, value in config_changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target
