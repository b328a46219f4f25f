"""Torch's parallel work in a serving replica runs on the engine thread only (and on the loader and
compile threads, which end). A request thread that runs one parallel torch op gets an OpenMP thread
team of its own, for the life of that thread; once OpenMP manages more threads than there are CPUs,
GNU OpenMP stops spinning between parallel regions and every U-Net op pays a futex wake-up. Measured
on a 2-core CPU: batch-1 latency 0.20 s -> 0.48 s for the rest of the process after one GET /info
(BENCHMARKS.md, "Peers"). A new team shows as native (non-Python) threads, counted here.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.chain import ChainSpec
from ddpm.checkpoint import ModelCard, save_model
from ddpm.image_request import ImageRequest
from ddpm.unet import UNet, UNetConfig
from service.engine.job import Job
from tests.app_client import app_and_state, wait_ready

# 3x32x32 with 64 channels: one image is 3,072 values (torch's round runs parallel above 2,048: the old
# PNG encoder started a team) and the first layer's activations 65,536 (a forward pass on a request
# thread, as /info's FLOP count was, starts one too)
SHAPE = UNetConfig(image_size=32, in_channels=3, base_channels=64, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4)


def native_threads() -> int:
    """Threads of this process that Python did not start (OpenMP's workers among them), once steady."""
    counts: list[int] = []
    while len(counts) < 5 or len(set(counts[-5:])) > 1:  # an ending thread team leaves over a few ms
        counts.append(len(os.listdir("/proc/self/task")) - threading.active_count())
        time.sleep(0.02)
    return counts[-1]


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_requests_start_no_thread_team_outside_the_engine(tmp_path: Path, two_threads: None) -> None:
    torch.manual_seed(0)
    model_dir = save_model(tmp_path / "m", UNet(SHAPE).eval(), ModelCard(unet=SHAPE, num_timesteps=50))
    client, state = app_and_state(model_dir, threads=2, max_batch=16, max_images_per_request=16)
    with client:
        wait_ready(client)
        state.wait_loaded()  # the loader thread (warm-up, FLOP count) has ended, and its team with it
        assert state.engine is not None
        job = state.engine.submit(Job(ImageRequest(0, 1, ChainSpec(2)), timeout_s=60))  # the engine's team starts; no request thread ran
        while not job.done:
            time.sleep(0.01)
        before = native_threads()
        assert client.get("/info").status_code == 200  # once counted the U-Net's FLOPs on a request thread (a forward pass)
        assert native_threads() == before, "GET /info"
        assert client.post("/generate", json={"seed": 1, "steps": 1, "batch_size": 16}).status_code == 200
        assert native_threads() == before, "16 images to PNG"
        photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        edit = {"seed": 2, "steps": 1, "batch_size": 16, "image": png_b64(photo), "strength": 0.5}
        assert client.post("/generate", json=edit).status_code == 200
        assert native_threads() == before, "an uploaded image"


def test_pixels_in_numpy_are_the_pixels_torch_made() -> None:
    """ddpm.grid.to_uint8 left torch for numpy (above): the same float32 arithmetic, the same rounding
    (half to even), so every served pixel is what it was; ties at .5, the clip edges and bf16 input included."""
    from ddpm.grid import to_uint8

    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 127.5 - 1  # x whose pixel value lands near k + 0.5
    x = torch.cat([torch.rand(4 * 3 * 16 * 16) * 2.4 - 1.2, ties, torch.tensor([-1.0, 1.0, -1e-8, 1e-8, 0.0, -5.0, 5.0])])
    x = x[: (x.numel() // 3) * 3].reshape(-1, 3, 1, 1)
    for batch in (x, x.bfloat16()):
        torch_made = ((batch.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(to_uint8(batch), torch_made)
