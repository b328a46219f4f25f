"""The serving path on the device under test (``DDPM_TEST_DEVICE``, default cpu): the GPU check
(benchmarks/gpu/run.sh) runs this file with ``DDPM_TEST_DEVICE=cuda``; CI runs it on CPU, which
rehearses the same code with the device the same as the reference.

The reproducibility contract across devices: image k of seed s from the device equals the CPU's
within ``CROSS_DEVICE_BOUND`` (max |difference| in [0, 1] pixel units). The noise is identical (the
Triton kernel and the PyTorch twin draw the same Philox numbers, tests/test_reverse_step.py); what
differs is the U-Net's float arithmetic (cuDNN's convolution algorithms, TF32 where allowed).
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from ddpm.inference_compile import hot_path
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from ddpm.shipped_models import DEFAULT_MODEL
from kernels.philox import seeds_to_tensor
from service.api.app import create_app
from service.engine.engine import Engine
from service.engine.job import Job
from service.settings import Settings
from tests.app_client import wait_ready
from tests.engine_jobs import wait_done
from tests.tiny_model import save_tiny_model

DEVICE = torch.device(os.environ.get("DDPM_TEST_DEVICE", "cpu"))
CROSS_DEVICE_BOUND = 2 / 255  # two 8-bit levels; measured on the GPU check (BENCHMARKS.md)
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.fail("DDPM_TEST_DEVICE=cuda but no CUDA device", pytrace=False)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float().cpu().clamp(-1, 1) + 1) / 2


def _reference(model_dir: Path, seed: int, n: int, steps: int) -> torch.Tensor:
    """The offline sampler on CPU, eager: the reference every device is held to."""
    cpu = load_model_source(model_dir, "cpu")
    with torch.inference_mode():
        return sample(cpu.eps_model, cpu.schedule, seeds_to_tensor(image_seeds(seed, n)), cpu.image_shape, steps=steps,
                      variance_type=cpu.variance_type, clip_denoised=cpu.clip_denoised)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=100)


def test_engine_on_device_matches_the_cpu_sampler(tiny_dir: Path) -> None:
    model = load_model_source(tiny_dir, DEVICE)
    engine = Engine(model, max_batch=8)
    engine.start()
    try:
        jobs = [
            engine.submit(Job(ImageRequest(s, 3, ChainSpec(st)), timeout_s=120)) for s, st in [(7, 40), (8, 100), (9, 13)]
        ]
        wait_done(*jobs, timeout=120)
    finally:
        engine.stop()
    for job in jobs:
        assert job.error is None and job.images is not None
        diff = (_to_unit(job.images) - _to_unit(_reference(tiny_dir, job.seed, job.n, job.steps))).abs().max().item()
        assert diff <= CROSS_DEVICE_BOUND, (job.seed, diff)


@pytest.mark.skipif(DEVICE.type == "cpu", reason="the compiled CPU path is tests/test_inference_compile.py's")
def test_compiled_hot_path_on_device_matches_eager(tiny_dir: Path) -> None:
    model = load_model_source(tiny_dir, DEVICE)
    fast = hot_path(model.eps_model, model.module, DEVICE, "on")
    assert fast.compiled and fast.step_backend == ("triton" if DEVICE.type == "cuda" else "torch_compiled")
    seeds = seeds_to_tensor(image_seeds(3, 5), DEVICE)
    with torch.inference_mode():
        eager = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=30, device=DEVICE)
        for b in (5, 1, 16):  # batch sizes the dynamic graph must take without recompiling per size
            compiled = sample(fast.eps_model, model.schedule, seeds_to_tensor(image_seeds(3, b), DEVICE), model.image_shape, steps=30,
                              device=DEVICE, step_fn=fast.step_fn)  # fmt: skip
            k = min(b, 5)
            assert (_to_unit(compiled[:k]) - _to_unit(eager[:k])).abs().max().item() <= CROSS_DEVICE_BOUND


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").exists(), reason="the shipped model is not in this checkout")
def test_shipped_model_same_images_on_device_and_cpu() -> None:
    """The contract across devices on the real model: 4 images, a 20-step chain."""
    model = load_model_source(DEFAULT_MODEL, DEVICE)
    seeds = seeds_to_tensor(image_seeds(11, 4), DEVICE)
    with torch.inference_mode():
        on_device = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=20, variance_type=model.variance_type,
                           clip_denoised=model.clip_denoised, device=DEVICE)  # fmt: skip
    diff = (_to_unit(on_device) - _to_unit(_reference(DEFAULT_MODEL, 11, 4, 20))).abs()
    print(f"cross-device {DEVICE} vs cpu, shipped model, 20 steps: max {diff.max().item():.2e} mean {diff.mean().item():.2e}")
    assert diff.max().item() <= CROSS_DEVICE_BOUND


def test_server_serves_on_device(tiny_dir: Path) -> None:
    # compile auto where it is the server's path on that device (CUDA: the GPU check); on CPU the background
    # compile is tests/test_background_compile.py's, and here it would only add its whole warm-up to the join below
    settings = Settings(model=tiny_dir, device=str(DEVICE), warmup_steps=1, max_batch=8, compile="auto" if DEVICE.type == "cuda" else "off")
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=300)
        info = next(line for line in c.get("/metrics").text.splitlines() if line.startswith("ddpm_model_info{"))
        assert f'device="{DEVICE}"' in info
        if DEVICE.type == "cuda":
            assert 'step_backend="triton"' in info
        r = c.post("/generate", json={"seed": 5, "batch_size": 2, "steps": 25, "sampler": "ddpm", "timestep_spacing": "linspace"})
        assert r.status_code == 200, r.text
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in r.json()["images"]]) / 255
        compile_thread = c.app.state.server.compile_thread  # type: ignore[attr-defined]
    if compile_thread is not None:  # a daemon that outlives the app here: dynamo in two threads at once breaks the next test's graphs
        compile_thread.join(timeout=300)
    ref = _to_unit(_reference(tiny_dir, 5, 2, 25))[:, 0].numpy()
    assert np.abs(pixels - ref).max() <= CROSS_DEVICE_BOUND + 1 / 255  # PNG rounding on top
