from __future__ import annotations

import os

# Triton kernels run on CPU tensors in the interpreter; must be set before triton.jit decorates them.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run eager (compiling every tiny model would cost minutes); test_inference_compile.py turns it on.
os.environ.setdefault("DDPM_COMPILE", "off")
# ... and in fp32 on every machine (`auto` picks bf16 only where the CPU has it): tests/test_precision.py covers bf16.
os.environ.setdefault("DDPM_PRECISION", "fp32")

import pytest

from ddpm.unet import UNet
from tests.tiny_model import random_tiny_unet


@pytest.fixture
def tiny_unet() -> UNet:
    return random_tiny_unet()
