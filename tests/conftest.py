from __future__ import annotations

import os

# Triton kernels run on CPU tensors in the interpreter; must be set before triton.jit decorates them.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run eager (compiling every tiny model would cost minutes); test_inference_compile.py turns it on.
os.environ.setdefault("DDPM_COMPILE", "off")
# ... and in fp32 on every machine (`auto` picks bf16 only where the CPU has it): tests/test_precision.py covers bf16.
os.environ.setdefault("DDPM_PRECISION", "fp32")

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ddpm.unet import UNet
from tests.app_client import app_client, wait_ready
from tests.tiny_model import random_tiny_unet, save_tiny_model


@pytest.fixture
def tiny_unet() -> UNet:
    return random_tiny_unet()


# The tiny model served in-process, for the modules that take these (a module's own fixture of the same
# name wins): its directory (T = 200) and a ready client; module-scoped, one of each per module.
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=200)


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with app_client(model_dir, max_images_per_request=4) as c:
        wait_ready(c)
        yield c
