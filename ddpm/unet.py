"""The DDPM U-Net eps_theta(x_t, t) (Ho et al. 2020, Appendix B; a PixelCNN++-style Wide ResNet).

Sinusoidal time embedding -> MLP; residual blocks with GroupNorm, SiLU and an additive time
projection; self-attention at the resolutions listed in ``attn_resolutions``; a down path whose
activations are concatenated into the up path (skip connections).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _is_count(value: object, least: int) -> bool:
    """An integer (an integer type: not a bool, a float or a string that reads as one) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.0
    num_groups: int = 8  # GroupNorm groups; the paper's 32 is too many for 32-channel layers
    # 0: unconditional (the paper's model). n > 0: class-conditional on labels 0..n-1, plus the null
    # label n ("no label"), which classifier-free guidance (Ho & Salimans 2022) trains by dropping labels
    num_classes: int = 0

    def __post_init__(self) -> None:
        # A config read from a file is checked before anything is built from it: a string, a float or a bool where a
        # count goes was coerced or failed deep in torch ("28" gave "not all arguments converted during string
        # formatting", num_groups 0 a ZeroDivisionError, dropout 2 an error from nn.Dropout).
        for name, least in (("image_size", 1), ("in_channels", 1), ("base_channels", 1), ("num_res_blocks", 0), ("num_groups", 1),
                            ("num_classes", 0)):  # fmt: skip
            if not _is_count(getattr(self, name), least):
                raise ValueError(f"{name} must be an integer >= {least}, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {self.dropout!r}")
        for name in ("channel_mult", "attn_resolutions"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(_is_count(v, 1) for v in values):
                raise ValueError(f"{name} must be a list of integers >= 1, got {values!r}")
            # JSON round trips give lists; keep the frozen config hashable and comparable.
            object.__setattr__(self, name, tuple(int(v) for v in values))
        downsamples = len(self.channel_mult) - 1
        if self.image_size % (2**downsamples):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{downsamples}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.num_groups:
                raise ValueError("every level's channel count must be divisible by num_groups")

    def check_new(self) -> None:
        """What a new training run must not ask for, though models trained so before still load (and their runs resume):
        no levels, an attention size the U-Net lacks (ignored: `--image-size 32` with the old default of 7 trained no
        attention at all), dropout outside [0, 1)."""
        if not self.channel_mult:
            raise ValueError("channel_mult must be one or more positive integers, got []")
        missing = [r for r in self.attn_resolutions if r not in self.resolutions]
        if missing:
            sizes = ", ".join(map(str, self.resolutions))
            raise ValueError(f"attn_resolutions {missing} are not feature-map sizes of this U-Net ({sizes})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The feature-map size of each level (image_size halved per level): where attention may go."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    @property
    def null_label(self) -> int:
        """The label index that means "unconditional" (num_classes; only for num_classes > 0)."""
        return self.num_classes

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> UNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**d)  # type: ignore[arg-type]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal position embedding of (possibly fractional) timesteps. (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity: stabler early training.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w)  # (B, 3, C, HW)
        q, k, v = (qkv[:, i].transpose(1, 2)[:, None] for i in range(3))  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, groups = cfg.base_channels, cfg.num_groups
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        # the class embedding is added to the time embedding; zero at start (training begins unconditional)
        self.label_emb: nn.Embedding | None = None
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_ch)
            nn.init.zeros_(self.label_emb.weight)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # Down path: remember each output's channel count for the matching skip in the up path.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, temb_ch, cfg.dropout, groups)])
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(AttnBlock(cur, groups))
                self.down.append(block)
                skip_chs.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [ResBlock(cur, cur, temb_ch, cfg.dropout, groups), AttnBlock(cur, groups), ResBlock(cur, cur, temb_ch, cfg.dropout, groups)]
        )

        # Up path: one more block per level than the down path, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skip_chs.pop(), ch * mult, temb_ch, cfg.dropout, groups)])
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(AttnBlock(cur, groups))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = nn.GroupNorm(groups, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(block: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps (one per sample); y: (B,) class labels of a
        class-conditional model (num_classes = the null label; None: all null). Returns eps, (B, C, H, W)."""
        temb = self.temb(timestep_embedding(t, self.config.base_channels))  # (B, 4*ch)
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.config.null_label)
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this U-Net is unconditional (num_classes = 0): it takes no labels")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, temb)
            skips.append(h)
        h = self._run(self.mid, h, temb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = self._run(block, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_flops_per_image(model: nn.Module, config: UNetConfig) -> float:
    """Forward FLOPs of eps_theta for one image at one step (ddpm.model_facts.flops_per_image_step)."""
    from ddpm.model_facts import flops_per_image_step

    shape = (config.in_channels, config.image_size, config.image_size)
    return float(flops_per_image_step(model, shape, next(model.parameters()).device))
