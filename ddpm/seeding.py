"""The per-image seed rule shared by ``ddpm sample`` and the server.

Image k of a request with seed s uses the 64-bit key ``image_seed(s, k) = splitmix64(splitmix64(s) + k)``
(arithmetic mod 2^64). Its noise is then drawn by counter-based Philox (``kernels.philox``) keyed by that
seed, so it depends on (s, k) alone: not on batch size, batch position or neighbours.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
MAX_SEED = 1 << 63  # the API accepts 0 <= seed < 2^63


def splitmix64(x: int) -> int:
    """Steele, Lea & Flood's SplitMix64 finaliser: a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def image_seed(seed: int, k: int) -> int:
    """The Philox key of image k of a request with the given seed."""
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if k < 0:
        raise ValueError("image index must be >= 0")
    return splitmix64((splitmix64(seed) + k) & MASK64)


def image_seeds(seed: int, n: int, first: int = 0) -> list[int]:
    """Keys of images first..first+n-1 of a request."""
    return [image_seed(seed, first + k) for k in range(n)]
