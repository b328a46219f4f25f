"""Ready before compiled, and never a compile on the serving thread: with DDPM_COMPILE=auto the server
answers on the eager path while the compiled graphs build behind it, switches each call shape once its
graphs exist, and no image changes beyond the compiled path's bound across the switch; a shape the
warm-up did not reach runs eagerly at once while the compile thread builds it; DDPM_COMPILE_BEFORE_READY
keeps the old order."""

from __future__ import annotations

import dataclasses
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
from service.engine.background_compile import COMPILED, BackgroundCompiler, PathSwitch, fully_compiled, group_of, ranges, with_rows
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
    """The compile is held back (a gate on BackgroundCompiler.build) so the test sees each phase: ready
    and serving while every group is still eager, a request in flight across the switch, then every
    group compiled; the images of the same requests agree to the compiled path's bound."""
    monkeypatch.delenv("DDPM_COMPILE", raising=False)  # the server's own default: auto
    gate = threading.Event()
    build = BackgroundCompiler.build

    def gated_build(self: BackgroundCompiler, raise_errors: bool = False) -> bool:
        gate.wait(300)
        return build(self, raise_errors)

    monkeypatch.setattr(BackgroundCompiler, "build", gated_build)
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
        # every size of every variant the warm-up runs, up to max_batch (the sweep)
        assert info["compiled_batches"] == dict.fromkeys(["step", "step+edit", "step+x0_prev", "step+x0_prev+edit", "unet"], "1-4")
        assert metric(c, 'ddpm_compiled_batch_sizes{variant="unet"}') == 4
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


def test_shutdown_stops_the_compile_thread_at_its_next_call() -> None:
    """A server that shuts down mid-build does not go on compiling (an in-process app, a test's, once kept
    a core busy for a minute after it closed): the build ends at the compile thread's next U-Net or step call."""
    from ddpm.inference_compile import hot_path
    from service.engine.engine import Engine
    from tests.tiny_model import random_tiny_unet, tiny_loaded_model

    unet = random_tiny_unet()
    model = tiny_loaded_model(unet, num_timesteps=50)
    eager = hot_path(model.eps_model, unet, "cpu", "off", "torch", precision="fp32")
    switch = PathSwitch(eager)
    calls: list[int] = []

    def make_compiled(eps: object, module: object):  # type: ignore[no-untyped-def]
        def counting(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            if len(calls) == 3:
                switch.close()  # the server's shutdown, while the warm-up of batch 1 runs
            return eager.eps_model(x, t, *labels)

        return dataclasses.replace(eager, eps_model=counting)  # eager stands in for compiled: no g++ needed

    compiler = BackgroundCompiler(model, switch, make_compiled, lambda m, step: Engine(m, max_batch=4, step_fn=step),
                                  warmup_steps=1, max_batch=4)  # fmt: skip
    thread = compiler.start()
    thread.join(60)
    assert not thread.is_alive() and compiler.built.is_set()
    assert len(calls) == 3 and set(calls) == {1}  # nothing after the close: no batch 2 or 4, no sweep
    assert switch.states["2+"] != COMPILED and not switch.asking


def _fake_path(name: str, calls: list[str]):  # type: ignore[no-untyped-def]
    from ddpm.inference_compile import HotPath

    def eps(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        calls.append(name)
        return x

    def step(x_t: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(name + "-step")
        return x_t

    return HotPath(eps, step, compiled=name == "compiled", step_backend=name)


def test_the_switch_routes_each_shape_and_asks_for_the_missing_ones() -> None:
    calls: list[str] = []
    switch = PathSwitch(_fake_path("eager", calls))
    one, four, t = torch.zeros(1, 1, 2, 2), torch.zeros(4, 1, 2, 2), torch.zeros(1)
    step_args = (one, None, None, None)  # eps, coefs, seeds, counters: no x0_prev, no edit
    switch.eps(one, t), switch.eps(four, t)
    switch.publish(_fake_path("compiled", calls))
    switch.cover(("unet", 1, (False,)))
    switch.cover(("step", 4, (False, False)))
    switch.asking = True  # the initial build is done
    switch.eps(one, t), switch.eps(four, t), switch.step(one, *step_args), switch.step(four, *step_args)
    switch.eps(four, t)  # asked once, counted each time
    assert calls == ["eager", "eager", "compiled", "eager", "eager-step", "compiled-step", "eager"]
    assert switch.recompiles_avoided == 3
    asked = [switch.requests.get_nowait()[0] for _ in range(2)]
    assert asked == [("unet", 4, (False,)), ("step", 1, (False, False))] and switch.requests.empty()
    assert switch.compiled_batches() == {"step": "4", "unet": "1"}


def test_with_rows_and_ranges() -> None:
    from kernels.reverse_step import StepCoefficients

    coefs = StepCoefficients(*torch.arange(16.0).reshape(8, 2))
    grown = with_rows((torch.arange(2.0), coefs, None), 5)
    assert grown[0].tolist() == [0, 1, 0, 1, 0] and grown[1].sigma.tolist() == [14, 15, 14, 15, 14] and grown[2] is None
    assert ranges([5, 1, 2, 3, 7, 8]) == "1-3,5,7-8" and ranges([]) == ""


class _BranchesOnBatch(torch.nn.Module):
    """An eps model whose forward branches on the batch size, as diffusers' upsampler does (at 64): dynamo
    splits the batch range there, so a graph built at batch 2 does not cover batch 3. One convolution:
    small graphs compile in seconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.conv(x) + t.view(-1, 1, 1, 1) * 1e-3
        return eps * 0.5 if x.shape[0] >= 3 else eps


def test_an_uncovered_batch_size_runs_eagerly_at_once_and_compiled_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up reaches batch 1, 2 and 4 only (the sweep is off here): a request of 3 images answers as
    fast as the eager path would, the compile thread builds batch 3, and the next such request runs it.
    No compile ever runs on the engine thread (inductor's compile_fx records the thread it runs on)."""
    import torch._inductor.compile_fx as compile_fx

    from ddpm.chain import ChainSpec
    from ddpm.image_request import ImageRequest
    from ddpm.inference_compile import hot_path
    from service.engine.engine import Engine
    from service.engine.job import Job
    from tests.tiny_model import tiny_loaded_model

    threads: list[str] = []
    real_compile_fx = compile_fx.compile_fx

    def recording_compile_fx(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return real_compile_fx(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compile_fx, "compile_fx", recording_compile_fx)
    monkeypatch.setattr(BackgroundCompiler, "_sweep", lambda self, recorder, sizes: None)
    module = _BranchesOnBatch().eval()
    model = tiny_loaded_model(module)  # type: ignore[arg-type]
    eager = hot_path(model.eps_model, module, "cpu", "off", "torch", precision="fp32")
    switch = PathSwitch(eager)
    engine = Engine(dataclasses.replace(model, eps_model=switch.eps), max_batch=4, step_fn=switch.step)
    # the step's backend named (the eager twin): only the U-Net compiles here, in seconds
    compiler = BackgroundCompiler(model, switch, lambda eps, m: hot_path(eps, m, "cpu", "on", "torch", precision="fp32"),
                                  lambda m, step: Engine(m, max_batch=4, step_fn=step), warmup_steps=1, max_batch=4)  # fmt: skip
    assert compiler.build(raise_errors=True)
    compiler.start(initial=False)
    eager_engine = Engine(dataclasses.replace(model, eps_model=eager.eps_model), max_batch=4, step_fn=eager.step_fn)

    def run(e: Engine, seed: int) -> tuple[float, Job]:
        job = Job(ImageRequest(seed, 3, ChainSpec(8, "ddpm")), timeout_s=120)
        start = time.monotonic()
        e.submit(job)
        while not job.done:
            time.sleep(0.002)
        assert job.error is None
        return time.monotonic() - start, job

    engine.start()
    eager_engine.start()
    try:
        eager_s = min(run(eager_engine, 1)[0] for _ in range(3))
        first_s, first = run(engine, 1)
        assert switch.recompiles_avoided >= 2  # the U-Net and the step at batch 3, eagerly
        assert first_s < 2 * eager_s + 0.5, (first_s, eager_s)  # no compile in the way
        end = time.monotonic() + 300
        while not {("unet", 3, (False,)), ("step", 3, (False, False))} <= switch.covered:
            assert time.monotonic() < end, switch.compiled_batches()
            time.sleep(0.05)
        before = switch.recompiles_avoided
        _, again = run(engine, 1)
        assert switch.recompiles_avoided == before  # the compiled graphs of batch 3 now
        np.testing.assert_allclose(again.images, first.images, atol=1e-4)  # type: ignore[arg-type]
    finally:
        engine.stop()
        eager_engine.stop()
        switch.close()
    assert threads and "ddpm-engine" not in threads, threads


def test_a_compile_that_fills_the_disk_says_so_in_a_line(tmp_path: Path) -> None:
    """g++'s error on a full /tmp is ~13 KB with the cause at its end (the image with a 64 MiB tmpfs on /tmp, where
    inductor writes ~160 MiB for the shipped model): the warning leads with it and the space left."""
    end = "cpp_prefix.h:1490:2: fatal error: cannot write PCH file: No space left on device\n"
    full = RuntimeError("warm-up failed: CppCompileError: C++ compile error\n" + "g++ -x c++-header -D X\n" * 200 + end)
    said = background_compile.compile_failure(full)
    assert said.startswith("no space left on device: ") and "MiB free" in said and len(said) < 400
    other = RuntimeError("inductor cannot build this model")
    assert background_compile.compile_failure(other) == "RuntimeError: inductor cannot build this model"
    dynamo = RuntimeError("warm-up failed: BackendCompilerFailed: backend='inductor' raised:\nImportError: /tmp/x.so: wrong ELF "
                          "class: ELFCLASS32\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this ...)\n")
    assert background_compile.compile_failure(dynamo) == ("RuntimeError: warm-up failed: BackendCompilerFailed: backend='inductor' "
                                                          "raised: ImportError: /tmp/x.so: wrong ELF class: ELFCLASS32")  # one line


def test_a_warm_up_that_fails_is_raised_not_logged_as_a_serving_fault(caplog: pytest.LogCaptureFixture) -> None:
    """The compile thread's warm-up engine (and the server's own) raise a failed warm-up to their caller, which logs it
    (the compile stays eager, or the model fails to load): the engine's "engine fault" error line was a second, misleading
    record of it (seen with a full /tmp: "engine fault in stage admit" beside the compile's warning)."""
    from service.engine.engine import Engine
    from tests.tiny_model import random_tiny_unet, tiny_loaded_model

    def faults(stage: str) -> None:
        if stage == "unet":
            raise RuntimeError("device fault")

    engine = Engine(tiny_loaded_model(random_tiny_unet(), num_timesteps=50), max_batch=2, faults=faults)
    with caplog.at_level("DEBUG", logger="ddpm.engine"), pytest.raises(RuntimeError, match="warm-up failed"):
        engine.warmup(1, sizes=[1])
    assert [r.levelname for r in caplog.records if "engine fault" in r.getMessage()] == ["DEBUG"]


def test_graphs_loaded_from_a_copy_that_fail_are_dropped_and_built_here_once(caplog: pytest.LogCaptureFixture) -> None:
    """A copy in DDPM_COMPILE_CACHE_DIR that passes its manifest but does not load here ("wrong ELF class" from a
    damaged kernel library, seen with a real copy): the compile failed, and so did every start that loaded it again,
    eager for good. Now the copy is taken out of the local cache and the build runs once more without it; a failure
    then is the compile's own (no third try)."""
    from ddpm.inference_compile import hot_path
    from service.engine.engine import Engine
    from tests.tiny_model import random_tiny_unet, tiny_loaded_model

    unet = random_tiny_unet()
    model = tiny_loaded_model(unet, num_timesteps=50)
    eager = hot_path(model.eps_model, unet, "cpu", "off", "torch", precision="fp32")
    events: list[str] = []
    loaded = {"copy": False}

    def make_compiled(eps: object, module: object):  # type: ignore[no-untyped-def]
        def compiled(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
            if loaded["copy"]:
                raise ImportError("cfv.main.so: wrong ELF class: ELFCLASS32")
            return eager.eps_model(x, t, *labels)

        return dataclasses.replace(eager, eps_model=compiled, compiled=True)  # eager stands in for compiled: no g++ needed

    def load() -> None:
        events.append("load")
        loaded["copy"] = True

    def drop() -> str | None:
        events.append("drop")
        was, loaded["copy"] = loaded["copy"], False
        return "/volume/compiled-abc" if was else None

    def build(switch: PathSwitch, fails_anyway: bool = False) -> bool:
        compiler = BackgroundCompiler(model, switch, make_compiled, lambda m, step: Engine(m, max_batch=2, step_fn=step),
                                      warmup_steps=1, max_batch=2, before_build=load, drop_loaded=drop,
                                      on_done=lambda: events.append("done"))  # fmt: skip
        if fails_anyway:
            compiler.make_compiled = lambda eps, module: dataclasses.replace(eager, eps_model=lambda *a: 1 / 0, compiled=True)
        return compiler.build()

    switch = PathSwitch(eager)
    with caplog.at_level("INFO", logger="ddpm.compile"):
        assert build(switch)
    assert events == ["load", "drop", "done"] and fully_compiled(switch.states)
    assert switch.compiled is not None and ("unet", 1, (False,)) in switch.covered
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and said[0].startswith("background compile failed at batch 1 with the compiled graphs of "
                                                 "/volume/compiled-abc loaded (RuntimeError: warm-up failed: ImportError: cfv.main.so: "
                                                 "wrong ELF class: ELFCLASS32): compiling again without them"), said  # fmt: skip

    events.clear()
    caplog.clear()
    switch = PathSwitch(eager)
    with caplog.at_level("INFO", logger="ddpm.compile"):
        assert not build(switch, fails_anyway=True)  # no copy's fault: it fails again, and stays failed
    assert events == ["load", "drop"] and switch.states == {"1": "failed", "2+": "failed"}
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 2 and said[1].startswith("background compile failed at batch 1 (RuntimeError: warm-up failed: ZeroDivisionError")
