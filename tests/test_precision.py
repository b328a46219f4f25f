"""The U-Net in low precision (ddpm/precision.py): what `auto` picks, that only eps is low precision,
the compiled path, the server's setting and label, and the contract's bound under bf16. Correctness
only: on a CPU without native bf16 these run (slowly) all the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import ddpm.precision as precision
from ddpm.inference_compile import cpu_compiler_available, hot_path
from ddpm.offline_sampler import sample
from ddpm.precision import resolve_precision, with_precision
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.api.app import create_app
from service.settings import Settings
from tests.app_client import wait_ready
from tests.tiny_model import random_tiny_unet, save_tiny_model, tiny_loaded_model

BF16_BATCH_BOUND = 2 / 255  # image k alone vs in a batch under bf16, [0, 1] units; measured 0 (tiny U-Net, AMD EPYC with AVX-512 BF16)


@pytest.mark.parametrize(("native", "allowed", "expected"), [(True, True, "bf16"), (False, True, "fp32"), (True, False, "fp32")])
def test_auto_picks_bf16_only_where_native_and_allowed(monkeypatch: pytest.MonkeyPatch, native: bool, allowed: bool, expected: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    monkeypatch.setattr(precision, "AUTO_ALLOWS_BF16", allowed)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize(
    ("cap", "native"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True)]
)
def test_auto_honours_onednns_isa_cap(monkeypatch: pytest.MonkeyPatch, cap: str, native: bool) -> None:
    # ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 BF16 machine (the suite's AVX2 pass): oneDNN would emulate bf16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision.native_bf16("cpu") is native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


def test_bad_precisions_are_refused() -> None:
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("int8", "cpu")


def test_only_eps_is_low_precision() -> None:
    unet = random_tiny_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        ref = unet(x, t)
        eps = with_precision(unet, "bf16", "cpu")(x, t)
    assert eps.dtype == torch.float32  # the step and x_t see fp32
    err = (eps - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()  # rounded to bf16, not garbage
    model = tiny_loaded_model(unet)
    seeds = seeds_to_tensor(image_seeds(3, 4))
    with torch.inference_mode():
        out = sample(with_precision(unet, "bf16", "cpu"), model.schedule, seeds, model.image_shape, steps=20)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_batch_independence_bound() -> None:
    unet = random_tiny_unet()
    model = tiny_loaded_model(unet)
    eps = with_precision(unet, "bf16", "cpu")
    with torch.inference_mode():
        alone = sample(eps, model.schedule, seeds_to_tensor(image_seeds(5, 1)), model.image_shape, steps=50)
        crowd = sample(eps, model.schedule, seeds_to_tensor(image_seeds(5, 16)), model.image_shape, steps=50)
    diff = ((alone[0] - crowd[0]).abs().max() / 2).item()  # [-1, 1] -> [0, 1] units
    assert diff <= BF16_BATCH_BOUND, diff


@pytest.mark.skipif(not cpu_compiler_available(), reason="torch.compile on CPU needs g++")
def test_compiled_path_in_bf16() -> None:
    unet = random_tiny_unet()
    eager = with_precision(unet, "bf16", "cpu")
    fast = hot_path(unet, unet, "cpu", "on", precision="bf16")
    assert fast.compiled and fast.precision == "bf16"
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.inference_mode():
        a, b = fast.eps_model(x, t), eager(x, t)
    assert a.dtype == torch.float32 and (a - b).abs().max().item() < 0.05


def test_server_precision_setting_and_label(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    with TestClient(create_app(Settings(model=model_dir, warmup_steps=1, max_batch=4, precision="bf16"))) as c:
        wait_ready(c, timeout=60)
        info = next(line for line in c.get("/metrics").text.splitlines() if line.startswith("ddpm_model_info{"))
        assert 'precision="bf16"' in info
        r = c.post("/generate", json={"seed": 1, "batch_size": 2, "steps": 10})
        assert r.status_code == 200 and r.json()["precision"] == "bf16"  # the client learns what its images depend on
    with TestClient(create_app(Settings(model=model_dir, warmup_steps=1, precision="fp32"))) as c:
        wait_ready(c, timeout=60)
        assert 'precision="fp32"' in c.get("/metrics").text
