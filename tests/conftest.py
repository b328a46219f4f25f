from __future__ import annotations

import os

# Triton kernels run on CPU tensors in the interpreter; must be set before triton.jit decorates them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ddpm.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)


@pytest.fixture
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    # Zero-initialised output layers make eps = 0; give them random weights so tests see a real eps.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def tiny_loaded_model(unet: UNet, num_timesteps: int = 1000):  # type: ignore[no-untyped-def]
    """A LoadedModel around a tiny U-Net, as the server would hold it."""
    from ddpm.model_source import LoadedModel
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
