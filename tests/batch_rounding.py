"""How far image k of a seed may move when the rows beside it change: the one tolerance of every test
that compares a row across batch compositions (alone vs in a batch, offline vs served).

The contract (README, "Reproducibility"): image k depends on its seed, chain and model, not on its
neighbours, up to float rounding in the U-Net's batched kernels, at most 1 PNG level (7.8e-3 in
[-1, 1]). The rounding comes from kernels whose blocking depends on the batch (on AVX2 the first op
that differs is the time embedding's Linear: MKL's GEMM rounds a row differently at batch 1, 2 and 4+):
eps moves by up to 4e-7 there, and the chain multiplies that by its largest
x0_from_eps = sqrt(1/abar_t - 1), 156 at t = T - 1 of the linear schedule: ~6e-5. Measured (the mixed
samplers' test over 30 random arrival orders, 2-core AMD EPYC): 1.4e-5 relative on AVX2 (5-step
DPM-Solver++), < 1e-5 on AVX-512. A wrong coefficient, counter or seed moves a row by 1e-2 or more.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

BATCH_ROUNDING = 1e-4  # relative to max(1, |image|): unclipped chains of the random tiny U-Net grow to ~1e2


def png_levels(b64: str) -> np.ndarray:
    """A base64 PNG's 8-bit levels as integers: two answers' images made beside different rows differ by at most 1."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)
