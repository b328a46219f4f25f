"""The compiled hot path (what `ddpm serve` runs by default on a machine with a C++ compiler) against
the eager reference: the channels-last compiled U-Net, the compiled Philox twin, and a server on it."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch._dynamo.utils import counters

from ddpm.chain import ChainSpec, ChainTables
from ddpm.inference_compile import CompiledEps, HotPath, compiled_step_twin, cpu_compiler_available, graph_bucket, hot_path, should_compile
from ddpm.offline_sampler import sample
from ddpm.respace import respace_steps
from ddpm.schedule import VarianceType, make_schedule
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from kernels.reverse_step import fused_reverse_step_torch
from service.api.app import create_app
from service.server_state import ServerState
from service.settings import Settings
from tests.app_client import wait_ready
from tests.tiny_model import TINY, random_tiny_unet, save_tiny_model

# .ci/run installs g++ and sets DDPM_REQUIRE_COMPILER=1: there these tests run (and fail without one)
pytestmark = pytest.mark.skipif(
    not cpu_compiler_available() and os.environ.get("DDPM_REQUIRE_COMPILER") != "1", reason="torch.compile on CPU needs a C++ compiler"
)
SHAPE = (TINY.in_channels, TINY.image_size, TINY.image_size)


def test_settings() -> None:
    assert should_compile("off", "cpu") is False
    assert should_compile("auto", "cpu") is True  # a compiler is present (module skip otherwise)
    assert should_compile("on", "cpu") is True
    with pytest.raises(ValueError, match="compile setting"):
        should_compile("fast", "cpu")


def test_compiled_unet_matches_eager_over_changing_batch_sizes() -> None:
    eager = random_tiny_unet()
    compiled = CompiledEps(random_tiny_unet())
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        for b in (1, 2, 5, 3, 8):  # the server's running batch changes size every iteration
            x = torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(b))
            t = torch.randint(0, 1000, (b,), generator=torch.Generator().manual_seed(b))
            out = compiled(x, t)
            assert out.shape == x.shape and out.is_contiguous()
            torch.testing.assert_close(out, eager(x, t), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # batch 1, and one graph with a dynamic batch for 2, 5, 3, 8


def test_graph_buckets_pad_the_batch_and_drop_the_padding() -> None:
    """The CUDA-graph path's padding (on CPU inductor skips the graphs themselves; the GPU check runs them):
    each row's output is the eager row's, whatever the bucket, and labels/timesteps stay valid."""
    assert [graph_bucket(n) for n in (1, 2, 3, 5, 16, 17, 64, 65, 200)] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    eager = random_tiny_unet()
    padded = CompiledEps(random_tiny_unet(), cuda_graphs=True)
    with torch.inference_mode():
        for b in (3, 5, 4):
            x = torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(b))
            t = torch.randint(0, 1000, (b,), generator=torch.Generator().manual_seed(b))
            out = padded(x, t)
            assert out.shape == x.shape and out.is_contiguous()
            torch.testing.assert_close(out, eager(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("sampler", "clip"), [("ddpm", False), ("ddpm", True), ("dpmsolver++", True), ("sde-dpmsolver++", False)])
def test_compiled_twin_matches_the_twin(sampler: str, clip: bool) -> None:
    tables = ChainTables(respace_steps(make_schedule("linear", 1000), 50), VarianceType.FIXED_SMALL, sampler=sampler, clip=clip)
    step = compiled_step_twin()
    for b in (1, 4, 7):
        g = torch.Generator().manual_seed(b)
        x, eps = torch.randn(b, 3, 9, 7, generator=g), torch.randn(b, 3, 9, 7, generator=g)
        x0_prev = torch.randn(b, 3, 9, 7, generator=g) if tables.multistep else None
        positions = torch.randint(0, 50, (b,), generator=g)
        seeds = seeds_to_tensor(image_seeds(b, b))
        counter = tables.timesteps[positions] + 1
        coefs = tables.coefficients(positions)
        want, want_x0 = fused_reverse_step_torch(x, eps, coefs, seeds, counter, x0_prev)
        got, got_x0 = step(x, eps, coefs, seeds, counter, x0_prev)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
        assert (got_x0 is None) == (want_x0 is None) == (x0_prev is None)
        if want_x0 is not None:
            torch.testing.assert_close(got_x0, want_x0, rtol=1e-5, atol=2e-6)


def test_compiled_twin_takes_the_jump_back_up() -> None:
    """Restart's and RePaint's jump (EditTerms) through the compiled twin: the eager twin's values."""
    from ddpm.editing import EDIT_ROW
    from kernels.reverse_step import EditTerms

    tables = ChainTables.for_spec(make_schedule("linear", 1000), VarianceType.FIXED_SMALL, ChainSpec(6, "restart", spacing="trailing"))
    step = compiled_step_twin()
    for b in (1, 5):
        g = torch.Generator().manual_seed(b)
        x, eps, x0_prev = (torch.randn(b, 3, 9, 7, generator=g) for _ in range(3))
        positions = torch.randint(0, tables.num_steps, (b,), generator=g)
        positions[0] = int(torch.nonzero(tables.edit_table[EDIT_ROW["jump_x"]] < 1)[0])  # row 0 jumps
        rows = tables.edit_table[:, positions]
        mask = (torch.rand(b, 3, 9, 7, generator=g) > 0.5).float()
        masked = torch.tensor([0.0] + [1.0] * (b - 1))  # the others blend a known region, as RePaint's rows do
        edit = EditTerms.from_chain_rows(torch.randn(b, 3, 9, 7, generator=g), mask, masked, rows)
        args = (x, eps, tables.coefficients(positions), seeds_to_tensor(image_seeds(b, b)), tables.counters[positions], x0_prev, edit)
        want, want_x0 = fused_reverse_step_torch(*args)
        got, got_x0 = step(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(got_x0, want_x0, rtol=1e-5, atol=2e-6)


def test_compiled_chain_matches_the_eager_chain() -> None:
    unet = random_tiny_unet()
    schedule = make_schedule("linear", 1000)
    seeds = seeds_to_tensor(image_seeds(3, 4))
    with torch.inference_mode():
        want = sample(unet, schedule, seeds, SHAPE, steps=20)
        fast = hot_path(unet, unet, "cpu", "on")
        got = sample(fast.eps_model, schedule, seeds, SHAPE, steps=20, step_fn=fast.step_fn)
    assert isinstance(fast.eps_model, CompiledEps) and fast.step_fn is compiled_step_twin() and fast.compiled
    assert hot_path(unet, unet, "cpu", "off") == HotPath(unet, None, compiled=False, step_backend="torch")
    assert hot_path(unet, unet, "cpu", "on", "torch").step_fn is None  # a backend named explicitly is kept
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_server_runs_the_compiled_path_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDPM_COMPILE")  # the suite's eager default off: the server's own default (auto)
    model_dir = save_tiny_model(tmp_path / "tiny", num_timesteps=200)
    settings = Settings(model=model_dir, warmup_steps=1, max_batch=8)
    assert settings.compile == "auto"
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=300)
        end = time.monotonic() + 300
        while not c.get("/info").json()["compiled"]:  # built in the background (test_background_compile.py)
            assert time.monotonic() < end, c.get("/info").json()["hot_path"]
            time.sleep(0.2)
        metrics = c.get("/metrics").text
        assert 'compiled="true"' in metrics and 'step_backend="torch_compiled"' in metrics
        body = {"seed": 7, "batch_size": 3, "steps": 20, "sampler": "ddpm", "timestep_spacing": "linspace"}  # the chain `want` runs
        r = c.post("/generate", json=body, headers={"Accept": "application/x-npy"})
        assert r.status_code == 200
        got = np.load(io.BytesIO(r.content))
    # the eager offline sampler on the same weights: the same images
    with torch.inference_mode():
        want = sample(random_tiny_unet(), make_schedule("linear", 200), seeds_to_tensor(image_seeds(7, 3)), SHAPE, steps=20)
    np.testing.assert_allclose(got, (want.clamp(-1, 1).numpy() + 1) / 2, atol=1e-4)


def test_engine_never_recompiles_after_warm_up() -> None:
    """The running batch changes size, mixes chain lengths and clip settings, and is built from fresh
    and carried-over tensors: after warm-up no new graph may be compiled (a recompile storm ends in
    dynamo's silent fallback to eager mode, which the load benchmark once caught at -25% throughput)."""
    from ddpm.image_request import ImageRequest
    from service.engine.engine import Engine
    from service.engine.job import Job
    from tests.tiny_model import tiny_loaded_model

    model = tiny_loaded_model(random_tiny_unet(), num_timesteps=100)
    fast = hot_path(model.eps_model, model.module, "cpu", "on")
    model.eps_model = fast.eps_model
    engine = Engine(model, max_batch=8, max_queue=1000, step_fn=fast.step_fn)
    engine.warmup(1)
    graphs = counters["stats"]["unique_graphs"]
    jobs = [Job(ImageRequest(i, 1 + i % 3, ChainSpec(steps=(3, 7, 12)[i % 3], clip=bool(i % 2))), timeout_s=600) for i in range(10)]
    sizes = set()
    for job in jobs[:4]:
        engine.submit(job)
    for i in range(200):
        if i % 4 == 0 and i // 4 + 4 < len(jobs):
            engine.submit(jobs[i // 4 + 4])
        sizes.add(engine.running)
        engine._iterate()
        if all(job.done for job in jobs):
            break
    assert all(job.done and job.error is None for job in jobs)
    assert len(sizes) >= 5  # the batch really did change size
    assert counters["stats"]["unique_graphs"] == graphs


def test_auto_falls_back_to_eager_when_compiling_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDPM_COMPILE=auto must never cost the service: a model inductor cannot compile is served eagerly;
    compile=on fails loudly instead."""

    def broken(self: CompiledEps, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("inductor cannot build this model")

    monkeypatch.setattr(CompiledEps, "__call__", broken)
    model_dir = save_tiny_model(tmp_path / "tiny", num_timesteps=100)
    with TestClient(create_app(Settings(model=model_dir, warmup_steps=1, max_batch=4, compile="auto"))) as c:
        wait_ready(c, timeout=120)
        assert 'compiled="false"' in c.get("/metrics").text
        assert c.post("/generate", json={"seed": 1, "steps": 3}).status_code == 200
    on = Settings(model=model_dir, warmup_steps=1, max_batch=4, compile="on")
    state = ServerState(on)
    with TestClient(create_app(on, state)) as c:
        end = time.monotonic() + 120
        while "model failed to load" not in c.get("/readyz").json().get("detail", ""):
            assert time.monotonic() < end, c.get("/readyz").json()
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 503
        assert state.load_error is not None and "inductor cannot build" in state.load_error  # the log has why
