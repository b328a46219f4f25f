"""Defects found by hostile testing (issue 11), each pinned: faults at every stage over HTTP,
readiness that heals, non-finite and duplicate JSON, Accept negotiation, text logs, SSE outcomes,
bounded progress, encoding off the event loop, every response counted, unhandled errors as JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ddpm.chain import ChainSpec
from service.api.app import create_app
from service.api.content_negotiation import negotiate
from service.api.request_log import JsonFormatter, TextFormatter
from service.engine.job import Job
from service.engine.job_handle import JobHandle
from service.fault_injection import FaultInjector
from service.server_state import ServerState
from service.settings import Settings
from tests.app_client import metric as _metric
from tests.app_client import wait_ready as _ready
from tests.tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=200)


def _start(model_dir: Path, **overrides: object) -> tuple[TestClient, ServerState]:
    settings = Settings(**{"model": model_dir, "warmup_steps": 1, "max_batch": 8, **overrides})  # type: ignore[arg-type]
    state = ServerState(settings)
    return TestClient(create_app(settings, state)), state


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    c, _ = _start(model_dir, max_images_per_request=4)
    with c:
        _ready(c)
        yield c


class OneFault:
    def __init__(self, stage: str) -> None:
        self.stage, self.fired = stage, False

    def __call__(self, stage: str) -> None:
        if stage == self.stage and not self.fired:
            self.fired = True
            raise RuntimeError(f"injected at {stage}")


# --- defect 1: a fault at any stage fails only its requests; the server goes on ---------------------------


STAGE_CODES = [("admit", 500), ("unet", 500), ("step", 500), ("advance", 500), ("observer", 200), ("encode", 500)]


@pytest.mark.parametrize(("stage", "code"), STAGE_CODES)
def test_a_fault_at_any_stage_answers_and_the_server_goes_on(
    model_dir: Path, stage: str, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    c, state = _start(model_dir)
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
    c, state = _start(model_dir)
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


# --- defect 2: readiness heals by itself, and ddpm_ready agrees with /readyz -----------------------------


def test_readiness_heals_without_traffic(model_dir: Path) -> None:
    c, state = _start(model_dir, fault_every_n_iterations=3)
    with c:
        _ready(c)
        assert state.engine is not None
        state.engine.health._first = state.engine.health._backoff = 0.2  # heal fast in the test (default 1 s)
        assert c.post("/generate", json={"seed": 1, "steps": 5}).status_code == 500  # call 3 fails
        assert c.get("/readyz").status_code == 503 and _metric(c, "ddpm_ready") == 0
        _ready(c, timeout=10)  # no request is sent: the idle self-test heals it
        assert _metric(c, "ddpm_ready") == 1 and state.engine.self_tests >= 1


# --- defect 3 and duplicate keys: strict JSON ---------------------------------------------------------------


@pytest.mark.parametrize("route", ["/generate", "/generate/stream"])
@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"seed": NaN}', "seed"),
        ('{"seed": 1, "batch_size": Infinity}', "batch_size"),
        ('{"seed": 1, "steps": -Infinity}', "steps"),
        ('{"seed": 1e400}', "seed"),
        ('{"seed": 1, "clip_denoised": NaN}', "clip_denoised"),
        ('{"seed": -1, "seed": 3}', "seed"),
    ],
)
def test_non_finite_numbers_and_duplicate_keys_are_422(client: TestClient, route: str, raw: str, field: str) -> None:
    before = _metric(client, 'ddpm_requests_total{code="422"}')
    r = client.post(route, content=raw.encode(), headers={"Content-Type": "application/json", "X-Request-ID": "strict-1"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["detail"].startswith(field + ":") and r.headers["x-request-id"] == "strict-1"
    assert len(r.content) < 1000
    assert _metric(client, 'ddpm_requests_total{code="422"}') == before + 1


def test_the_422_echo_survives_non_finite_input(client: TestClient) -> None:
    # even where a non-finite value reaches pydantic (a nested value), the error echo is valid JSON
    r = client.post("/generate", content=b'{"seed": [1, NaN]}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("seed")


# --- defect 7: Accept negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("image/png;q=0, application/json", "application/json"),
        ("IMAGE/PNG", "image/png"),
        ("image/*", "image/png"),
        ("application/x-npy;q=0.5, image/png;q=0.9", "image/png"),
        ("application/*;q=0.1, application/x-npy", "application/x-npy"),
        ("text/html", None),
        ("image/png;q=0", None),
        ("*/*;q=0", None),
        ("garbage", "application/json"),  # no valid media range: as if absent
    ],
)
def test_negotiate(accept: str | None, expected: str | None) -> None:
    assert negotiate(accept, ["application/json", "image/png", "application/x-npy"]) == expected


def test_accept_over_http(client: TestClient) -> None:
    body = {"seed": 3, "batch_size": 1, "steps": 3}
    assert client.post("/generate", json=body, headers={"Accept": "image/png;q=0, application/json"}).headers["content-type"] == (
        "application/json"
    )
    assert client.post("/generate", json=body, headers={"Accept": "Image/PNG"}).headers["content-type"] == "image/png"
    before = _metric(client, "ddpm_iterations_total")
    r = client.post("/generate", json=body, headers={"Accept": "text/html"})
    assert r.status_code == 406 and "image/png" in r.json()["detail"]
    assert _metric(client, "ddpm_iterations_total") == before  # refused before any work
    assert client.post("/generate/stream", json=body, headers={"Accept": "application/json"}).status_code == 406
    assert _metric(client, 'ddpm_requests_total{code="406"}') == 2


# --- defect 6: text logs keep the fields --------------------------------------------------------------------


def test_text_log_format_keeps_every_field() -> None:
    record = logging.LogRecord("ddpm.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "abc", "status": 200, "path": "/generate", "duration_s": 0.5}  # type: ignore[attr-defined]
    line = TextFormatter().format(record)
    assert line.endswith('INFO ddpm.access request request_id="abc" status=200 path="/generate" duration_s=0.5'), line


# --- defect 8: a stream's access-log line carries its real outcome ------------------------------------------


def test_stream_outcome_in_the_access_log(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    c, _ = _start(model_dir, request_timeout_s=0.2)
    with c, caplog.at_level(logging.INFO, logger="ddpm.access"):
        _ready(c)
        with c.stream("POST", "/generate/stream", json={"seed": 1, "batch_size": 4, "steps": 200}) as r:
            text = "".join(r.iter_text())
        assert r.status_code == 200 and "event: error" in text and '"status": 504' in text
        line = next(json.loads(JsonFormatter().format(x)) for x in caplog.records if x.name == "ddpm.access")
        assert (line["status"], line["http_status"], line["outcome"]) == (504, 200, "timeout")
        assert _metric(c, 'ddpm_requests_total{code="504"}') == 1


# --- concerns: bounded progress, encoding off the loop, every response counted, unhandled errors ------------


def test_a_stalled_stream_reader_holds_one_progress_event() -> None:
    async def scenario() -> int:
        job = Job(seed=0, n=1, chain=ChainSpec(steps=1000, clip=True), timeout_s=60)
        handle = JobHandle(job, asyncio.get_running_loop(), stream=True)
        worker = threading.Thread(target=lambda: [(setattr(job, "steps_done", i), job.on_progress(job)) for i in range(1000)])  # type: ignore[misc]
        worker.start()
        worker.join()
        await asyncio.sleep(0.05)  # the loop runs every callback; nobody reads
        assert handle._latest is not None and handle._latest.steps_done == 999
        return handle.pending_progress

    assert asyncio.run(scenario()) == 1


@pytest.mark.parametrize(
    ("module_name", "encoder", "path", "body", "headers"),
    [
        ("service.api.routes.generate", "png_bytes", "/generate", {"seed": 1, "steps": 2}, {"Accept": "image/png"}),
        ("service.api.routes.openai_images", "image_pngs", "/v1/images/generations", {"prompt": "x", "seed": 1, "steps": 2}, {}),
    ],
)
def test_encoding_runs_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, module_name: str, encoder: str, path: str, body: dict, headers: dict
) -> None:
    import importlib

    module = importlib.import_module(module_name)
    threads: list[str] = []
    real = getattr(module, encoder)

    def spy(images):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(images)

    monkeypatch.setattr(module, encoder, spy)
    assert client.post(path, json=body, headers=headers).status_code == 200
    assert threads and threads[0] != "MainThread" and not threads[0].startswith("AnyIO")


def test_every_response_is_counted(model_dir: Path) -> None:
    c, _ = _start(model_dir, api_token="t0ken", max_body_bytes=256)
    with c:
        _ready(c)
        assert c.post("/generate", json={"seed": 1}).status_code == 401
        assert c.post("/generate", content=b"x" * 300, headers={"Content-Type": "application/json"}).status_code == 413
        assert c.get("/nope").status_code == 404
        assert _metric(c, 'ddpm_requests_total{code="401"}') == 1 and _metric(c, 'ddpm_requests_total{code="413"}') == 1
        assert _metric(c, 'ddpm_http_responses_total{code="401",route="/generate"}') == 1
        assert _metric(c, 'ddpm_http_responses_total{code="404",route="other"}') == 1
        assert _metric(c, 'ddpm_request_duration_seconds_count{outcome="unauthorized"}') == 1


def test_an_unhandled_error_is_a_json_500_with_the_request_id(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    state: ServerState = client.app.state.server  # type: ignore[attr-defined]

    def broken(client_key: str, n: int) -> bool:
        raise KeyError("bug")

    monkeypatch.setattr(state.clients, "acquire", broken)
    before = _metric(client, 'ddpm_requests_total{code="500"}')
    # a seed no other test asks for: a cached answer would need no quota (and not reach the bug)
    r = client.post("/generate", json={"seed": 424242, "steps": 2}, headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "internal server error", "request_id": "boom-1"} and r.headers["x-request-id"] == "boom-1"
    assert _metric(client, 'ddpm_requests_total{code="500"}') == before + 1


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


def test_a_hung_device_call_is_detected_and_fatal(model_dir: Path) -> None:
    # a device call that never returns cannot raise: the watchdog notices the engine making no progress
    c, state = _start(model_dir, stall_timeout_s=0.5, request_timeout_s=1.0)
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
            assert r.status_code == 504 and time.monotonic() - start < 1.0 + JobHandle.BACKSTOP_S + 2  # the backstop answers
            end = time.monotonic() + 5
            while not fatal:
                assert time.monotonic() < end, "the watchdog did not fire"
                time.sleep(0.05)
            assert "engine stalled" in fatal[0]
            assert c.get("/healthz").status_code == 503 and c.get("/readyz").json()["detail"] == "engine stalled (see the server log)"
        finally:
            release.set()
