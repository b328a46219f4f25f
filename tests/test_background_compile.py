"""Ready before compiled: with DDPM_COMPILE=auto the server answers on the eager path while the compiled
graphs build behind it, switches each batch-size group once its graphs exist, and no image changes
beyond the compiled path's bound across the switch; DDPM_COMPILE_BEFORE_READY keeps the old order."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ddpm.inference_compile import cpu_compiler_available
from service.api.app import create_app
from service.engine import background_compile
from service.engine.background_compile import COMPILED, PathSwitch, fully_compiled, group_of
from service.settings import Settings
from tests.app_client import metric, wait_ready
from tests.tiny_model import save_tiny_model

pytestmark = pytest.mark.skipif(not cpu_compiler_available(), reason="torch.compile on CPU needs a C++ compiler")
CHAIN = {"steps": 12, "sampler": "ddpm", "timestep_spacing": "linspace"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=100)


def _npy(c: TestClient, seed: int, n: int) -> np.ndarray:
    r = c.post("/generate", json={"seed": seed, "batch_size": n, **CHAIN}, headers={"Accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content))


def _wait_compiled(c: TestClient, timeout: float = 300.0) -> dict:
    end = time.monotonic() + timeout
    while not (info := c.get("/info").json())["compiled"]:
        assert time.monotonic() < end and "failed" not in info["hot_path"].values(), info["hot_path"]
        time.sleep(0.2)
    return info


def test_group_of_batch_sizes() -> None:
    assert [group_of(n) for n in (1, 2, 15, 16, 64)] == ["1", "2+", "2+", "2+", "2+"]


def test_ready_on_the_eager_path_then_switched_without_changing_images(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled graphs are held back (a gate on PathSwitch.enable) so the test sees each phase:
    ready and serving while every group is still eager, a request in flight across the switch, then
    every group compiled; the images of the same requests agree to the compiled path's bound."""
    monkeypatch.delenv("DDPM_COMPILE", raising=False)  # the server's own default: auto
    gate = threading.Event()
    enable = PathSwitch.enable

    def gated_enable(self: PathSwitch, group: str, compiled: object) -> None:
        gate.wait(300)
        enable(self, group, compiled)  # type: ignore[arg-type]

    monkeypatch.setattr(PathSwitch, "enable", gated_enable)
    # fp32: in-process, a deadlock between the threads would freeze pytest itself; the bf16 (autocast)
    # case runs in a server process with traffic during the compile (tests/test_compile_cache.py)
    settings = Settings(model=model_dir, warmup_steps=1, max_batch=4, response_cache_mb=0, precision="fp32")
    assert settings.compile == "auto" and not settings.compile_before_ready
    with TestClient(create_app(settings)) as c:
        start = time.monotonic()
        wait_ready(c, timeout=120)
        info = c.get("/info").json()
        assert not info["compiled"] and set(info["hot_path"].values()) <= {"eager", "compiling"}, info["hot_path"]
        assert info["step_backend"] == "torch"  # the eager twin until the compiled one is ready
        assert metric(c, 'ddpm_hot_path_compiled{batch="1"}') == 0 and 'compiled="false"' in c.get("/metrics").text
        eager_one, eager_three = _npy(c, 7, 1), _npy(c, 8, 3)  # batch 1 and a batch of 3, eagerly
        ready_s = time.monotonic() - start
        # a request in flight when the graphs are switched in
        across: dict[str, np.ndarray] = {}
        request = threading.Thread(target=lambda: across.update(x=_npy(c, 9, 2)))
        request.start()
        gate.set()
        request.join(300)
        info = _wait_compiled(c)
        assert info["hot_path"] == {"1": COMPILED, "2+": COMPILED} and info["step_backend"] == "torch_compiled"
        assert metric(c, 'ddpm_hot_path_compiled{batch="1"}') == 1 and metric(c, 'ddpm_hot_path_compiled{batch="2+"}') == 1
        assert 'compiled="true"' in c.get("/metrics").text
        np.testing.assert_allclose(_npy(c, 7, 1), eager_one, atol=1e-4)
        np.testing.assert_allclose(_npy(c, 8, 3), eager_three, atol=1e-4)
        np.testing.assert_allclose(_npy(c, 9, 2), across["x"], atol=1e-4)
    assert ready_s < 60  # eager warm-up only (a compile of this model takes longer on this CPU)


def test_compile_before_ready_keeps_readiness_until_compiled(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDPM_COMPILE", raising=False)
    with TestClient(create_app(Settings(model=model_dir, warmup_steps=1, max_batch=4, compile_before_ready=True, precision="fp32"))) as c:
        wait_ready(c, timeout=300)
        info = c.get("/info").json()  # compiled at the moment it is ready: nothing runs eagerly
        assert info["compiled"] and info["hot_path"] == {"1": COMPILED, "2+": COMPILED}
        assert c.post("/generate", json={"seed": 1, **CHAIN}).status_code == 200


def test_a_failed_background_compile_keeps_serving_eagerly(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDPM_COMPILE", raising=False)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("inductor cannot build this model")

    monkeypatch.setattr(background_compile, "compile_copy", broken)
    with TestClient(create_app(Settings(model=model_dir, warmup_steps=1, max_batch=4, precision="fp32"))) as c:
        wait_ready(c, timeout=120)
        end = time.monotonic() + 60
        while set(c.get("/info").json()["hot_path"].values()) != {"failed"}:
            assert time.monotonic() < end, c.get("/info").json()
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200 and c.post("/generate", json={"seed": 1, **CHAIN}).status_code == 200


def test_the_switch_routes_each_group() -> None:
    calls: list[str] = []

    def path(name: str):  # type: ignore[no-untyped-def]
        from ddpm.inference_compile import HotPath

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return x

        def step(x_t: torch.Tensor, *args: object) -> torch.Tensor:
            calls.append(name + "-step")
            return x_t

        return HotPath(eps, step, compiled=name == "compiled", step_backend=name)

    switch = PathSwitch(path("eager"))
    one, four, t = torch.zeros(1, 1, 2, 2), torch.zeros(4, 1, 2, 2), torch.zeros(1)
    switch.eps(one, t), switch.eps(four, t)
    switch.enable("1", path("compiled"))
    switch.eps(one, t), switch.eps(four, t), switch.step(one), switch.step(four)
    assert calls == ["eager", "eager", "compiled", "eager", "compiled-step", "eager-step"]
    assert switch.states == {"1": COMPILED, "2+": "eager"} and not fully_compiled(switch.states)
