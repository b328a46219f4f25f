"""A fault at any stage of an iteration fails only its requests and the server goes on; a dead engine
answers what waits and fails the probes; readiness heals by itself; a hung device call is fatal; the
fault injector's schedule."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from service.api.job_handle import JobHandle
from service.api.request_log import JsonFormatter
from service.fault_injection import FaultInjector
from tests.app_client import app_and_state
from tests.app_client import metric as _metric
from tests.app_client import wait_ready as _ready


class OneFault:
    def __init__(self, stage: str) -> None:
        self.stage, self.fired = stage, False

    def __call__(self, stage: str) -> None:
        if stage == self.stage and not self.fired:
            self.fired = True
            raise RuntimeError(f"injected at {stage}")


STAGE_CODES = [("admit", 500), ("unet", 500), ("step", 500), ("advance", 500), ("observer", 200), ("encode", 500)]


def test_an_image_that_ends_in_nan_is_a_500_naming_it_and_the_server_stays_ready(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a 200 with a black square (the encoder cast NaN to 0). The model's eps is NaN for one x_T: seed 3's image 0."""
    import torch

    import service.server_state
    from ddpm.seeding import image_seeds
    from kernels.philox import sample_noise, seeds_to_tensor

    poisoned = float(sample_noise(seeds_to_tensor(image_seeds(3, 1)), 0, (1, 8, 8)).flatten()[0])
    load = service.server_state.load_unchanged

    def overflowing_for_one_input(spec: object, device: object, measure: object) -> object:
        model, measured = load(spec, device, measure)
        eps_model = model.eps_model

        def eps(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
            return eps_model(x, t, *labels).masked_fill((x.flatten(1)[:, 0] == poisoned).view(-1, 1, 1, 1), float("nan"))

        model.eps_model = eps
        return model, measured

    monkeypatch.setattr(service.server_state, "load_unchanged", overflowing_for_one_input)
    c, _state = app_and_state(model_dir, compile="off")
    with c:
        _ready(c)
        r = c.post("/generate", json={"seed": 3, "batch_size": 2, "steps": 3, "sampler": "ddim"})
        assert r.status_code == 500, r.text
        assert r.json()["detail"].startswith("the model's output was not finite (NaN or infinity) for image 0 of this seed: "), r.text
        assert _metric(c, 'ddpm_engine_faults_total{stage="output"}') == 1
        assert c.get("/readyz").status_code == 200 and c.post("/generate", json={"seed": 4, "steps": 3}).status_code == 200
        part = c.post("/generate", json={"seed": 3, "first_image": 1, "steps": 3, "sampler": "ddim"})  # image 1 of the seed is fine
        assert part.status_code == 200, part.text


@pytest.mark.parametrize(("stage", "code"), STAGE_CODES)
def test_a_fault_at_any_stage_answers_and_the_server_goes_on(
    model_dir: Path, stage: str, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    c, state = app_and_state(model_dir)
    with c:
        _ready(c)
        assert state.engine is not None
        fault = OneFault(stage)
        if stage == "encode":
            state.faults = fault  # type: ignore[assignment]
        else:
            state.engine.faults = fault
        with caplog.at_level(logging.ERROR):
            r = c.post("/generate", json={"seed": 1, "batch_size": 2, "steps": 5}, headers={"X-Request-ID": f"req-{stage}"})
        assert fault.fired and r.status_code == code, r.text
        if code == 500:
            assert r.headers["content-type"] == "application/json" and "RuntimeError" in r.json()["detail"]
            # logged as JSON with the request id of every request it failed
            fields = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records if rec.levelno >= logging.ERROR]
            assert any(f.get("stage") == stage and ("req-" + stage in f.get("request_ids", []) or f.get("request_id") == "req-" + stage)
                       for f in fields), fields  # fmt: skip
        assert _metric(c, f'ddpm_engine_faults_total{{stage="{stage}"}}') >= 1
        again = c.post("/generate", json={"seed": 2, "steps": 5})
        assert again.status_code == 200  # the engine goes on
        assert _metric(c, "ddpm_running_samples") == 0 and _metric(c, "ddpm_queue_depth") == 0


def test_a_dead_engine_answers_waiting_requests_and_fails_probes(model_dir: Path) -> None:
    c, state = app_and_state(model_dir)
    with c:
        _ready(c)
        fatal: list[str] = []
        state.on_fatal = fatal.append
        assert state.engine is not None
        state.engine.faults = OneFault("loop")
        r = c.post("/generate", json={"seed": 1, "steps": 5})
        assert r.status_code == 503 and "Retry-After" in r.headers and "engine stopped" in r.json()["detail"]
        end = time.monotonic() + 5
        while not fatal:
            assert time.monotonic() < end
            time.sleep(0.01)
        assert "injected at loop" in fatal[0]  # `ddpm serve` exits non-zero on this (test_server_process)
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 503
        assert _metric(c, "ddpm_ready") == 0
        refused = c.post("/generate", json={"seed": 1, "steps": 5})
        assert refused.status_code == 503 and "Retry-After" in refused.headers


def test_readiness_heals_without_traffic(model_dir: Path) -> None:
    c, state = app_and_state(model_dir, fault_every_n_iterations=3)
    with c:
        _ready(c)
        assert state.engine is not None
        state.engine.health._first = state.engine.health._backoff = 0.2  # heal fast in the test (default 1 s)
        assert c.post("/generate", json={"seed": 1, "steps": 5}).status_code == 500  # call 3 fails
        assert c.get("/readyz").status_code == 503 and _metric(c, "ddpm_ready") == 0
        _ready(c, timeout=10)  # no request is sent: the idle self-test heals it
        assert _metric(c, "ddpm_ready") == 1 and state.engine.self_tests >= 1


def test_a_hung_device_call_is_detected_and_fatal(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a device call that never returns cannot raise: the request's own backstop answers it after its deadline,
    # and the watchdog notices the engine making no progress (tests/test_server_process.py: what the process does then)
    monkeypatch.setattr(JobHandle, "BACKSTOP_S", 0.3)
    c, state = app_and_state(model_dir, stall_timeout_s=1.5, request_timeout_s=0.3)
    with c:
        _ready(c)
        fatal: list[str] = []
        state.on_fatal = fatal.append
        assert state.engine is not None
        release = threading.Event()
        real = state.engine.model.eps_model

        def hung(x, t):  # type: ignore[no-untyped-def]
            release.wait(30)
            return real(x, t)

        state.engine.model.eps_model = hung
        try:
            start = time.monotonic()
            r = c.post("/generate", json={"seed": 1, "steps": 5})
            assert r.status_code == 504 and time.monotonic() - start < 0.3 + 0.3 + 1  # the backstop answers, before the stall bound
            end = time.monotonic() + 5
            while not fatal:
                assert time.monotonic() < end, "the watchdog did not fire"
                time.sleep(0.05)
            assert "engine stalled" in fatal[0]
            assert c.get("/healthz").status_code == 503 and c.get("/readyz").json()["detail"] == "engine stalled (see the server log)"
        finally:
            release.set()


def test_fault_injector_schedule() -> None:
    f = FaultInjector(every_n=3, rate=0.5, stages=("admit",), seed=1, duration_s=0.2)
    f("unet")  # not armed yet: nothing raises
    f.arm()
    hits = 0
    for _ in range(200):
        try:
            f("admit")
        except RuntimeError:
            hits += 1
    assert 60 < hits < 140  # rate 0.5
    with pytest.raises(RuntimeError):
        f("unet"), f("unet"), f("unet")  # every 3rd U-Net call
    time.sleep(0.25)
    for _ in range(50):
        f("admit")  # past duration_s: quiet
    with pytest.raises(ValueError, match="unknown fault stages"):
        FaultInjector(stages=("nope",))
