"""The U-Net: output shape, time conditioning, the timestep embedding, config validation and round trip, and the FLOP count."""

from __future__ import annotations

import pytest
import torch

from ddpm.unet import UNet, UNetConfig, count_flops_per_image, timestep_embedding

CONFIGS = [
    UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), attn_resolutions=(4,), num_groups=4),
    UNetConfig(
        image_size=16, in_channels=3, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 4), num_groups=8
    ),
    UNetConfig(image_size=28, base_channels=8, channel_mult=(1, 2, 2), attn_resolutions=(7,), num_groups=4),
    UNetConfig(image_size=32, in_channels=3, base_channels=8, channel_mult=(1, 1, 2, 2), attn_resolutions=(), num_groups=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.image_size}px-{c.in_channels}ch-{len(c.channel_mult)}lvl")
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_matches_input(config: UNetConfig, batch: int) -> None:
    torch.manual_seed(0)
    model = UNet(config)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    out = model(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == x.shape
    out.sum().backward()  # every parameter on the graph
    assert all(p.grad is not None for p in model.parameters())


def test_time_conditioning_changes_output() -> None:
    torch.manual_seed(0)
    model = UNet(CONFIGS[0])
    for p in model.parameters():  # undo the zero init so the output depends on everything
        torch.nn.init.normal_(p, 0, 0.05)
    x = torch.randn(2, 1, 8, 8)
    a = model(x, torch.tensor([10, 10]))
    b = model(x, torch.tensor([10, 900]))
    assert torch.allclose(a[0], b[0], atol=1e-6)
    assert not torch.allclose(a[1], b[1], atol=1e-4)


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 32)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb[0, :16], torch.zeros(16)) and torch.allclose(emb[0, 16:], torch.ones(16))
    assert torch.allclose(emb[1, 0], torch.sin(torch.tensor(1.0)))


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="num_groups"):
        UNetConfig(base_channels=12, num_groups=8)
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"image_size": 8, "bogus": 1})


def test_config_round_trip() -> None:
    cfg = CONFIGS[1]
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_flop_count_grows_with_width() -> None:
    small = UNetConfig(image_size=28, base_channels=16, attn_resolutions=(7,), num_groups=8)
    big = UNetConfig(image_size=28, base_channels=32, attn_resolutions=(7,), num_groups=8)
    f_small, f_big = count_flops_per_image(UNet(small), small), count_flops_per_image(UNet(big), big)
    # convolutions dominate and scale with channels^2
    assert 3.0 < f_big / f_small < 4.2
    # the shipped default: measured 0.380 GFLOP per image-step (README, model card)
    default = UNetConfig()
    assert count_flops_per_image(UNet(default), default) / 1e9 == pytest.approx(0.380, abs=0.005)
