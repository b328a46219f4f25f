"""A plain-PyTorch twin of Triton's counter-based ``tl.randn`` (triton/language/random.py).

Same Philox4x32-10 rounds, same key split (key = (seed_lo, seed_hi)), same counter layout
(c0 = offset_lo, c1 = offset_hi, c2 = c3 = 0), same uint -> float conversion and Box-Muller, so a
(seed, offset) gives the same normal number here on CPU and inside a Triton kernel on GPU, up to
the last bits of log/cos.

Counter layout of ddpm-serve: offset = (counter_hi << 32) | element, where element indexes the
sample's own C*H*W values and counter_hi is the paper's timestep t whose noise is drawn (1..T for
z in Algorithm 2's step from x_t; 0 for x_T itself).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
# Largest int32 times this stays < 1.0 in float32 (Triton's uint_to_uniform_float). The float constants here
# multiply float32 tensors as Python floats (rounded to float32, as torch.tensor(c, float32) would be): a
# torch.tensor call in the compiled twin's graph kept AOTAutograd from caching it (tests/test_reverse_step.py).
UINT_TO_FLOAT_SCALE = 4.6566127342e-10


def seeds_to_tensor(seeds: list[int] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """64-bit unsigned seeds as an int64 tensor holding the same bits (seeds >= 2^63 wrap negative)."""
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64)
    signed = [s - (1 << 64) if s >= (1 << 63) else s for s in seeds]
    return torch.tensor(signed, dtype=torch.int64, device=device)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products of two 32-bit values wrap mod 2^64 with the right bits; mask off the sign fill.
    prod = b * a
    return (prod >> 32) & _M32, prod & _M32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds on uint32 values carried in int64 tensors (broadcasting)."""
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= (1 << 31), x - (1 << 32), x)  # bitcast uint32 -> int32
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x
    return signed.to(torch.float32) * UINT_TO_FLOAT_SCALE


def philox_randn(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randn(seed, offset) elementwise, broadcasting seeds (int64 bits of uint64) against offsets (int64)."""
    k0 = seeds & _M32
    k1 = (seeds >> 32) & _M32
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    zero = torch.zeros_like(c0)
    r0, r1, _, _ = philox4x32(c0, c1, zero, zero, k0, k1)
    u1 = torch.clamp(_uint_to_uniform(r0), min=1.0e-7)
    u2 = _uint_to_uniform(r1)
    # Box-Muller, the cosine half (as tl.randn).
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(6.283185307179586 * u2)


def sample_noise(seeds: torch.Tensor, counter: torch.Tensor | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of shape (B, *shape): sample i keyed by seeds[i], counter_hi = counter[i]."""
    b = seeds.shape[0]
    numel = 1
    for d in shape:
        numel *= d
    counter_t = torch.as_tensor(counter, dtype=torch.int64, device=seeds.device).expand(b)
    elements = torch.arange(numel, dtype=torch.int64, device=seeds.device)
    offsets = (counter_t[:, None] << 32) | elements[None, :]  # (B, numel)
    return philox_randn(seeds[:, None], offsets).reshape(b, *shape)
