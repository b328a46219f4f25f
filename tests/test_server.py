"""The HTTP API on a tiny model: contract, errors, reproducibility, batching, backpressure, metrics."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ddpm.schedule import make_schedule
from service.api.app import create_app
from service.settings import Settings
from tests.app_client import app_client
from tests.app_client import metric as _metric
from tests.app_client import wait_ready as _wait_ready
from tests.prometheus_text import sample_value
from tests.tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with app_client(model_dir, max_images_per_request=16) as c:
        _wait_ready(c)
        yield c


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# --- contract ---------------------------------------------------------------------------------------


def test_generate_json(client: TestClient) -> None:
    r = client.post("/generate", json={"seed": 7, "batch_size": 3, "steps": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in ("seed", "batch_size", "steps", "model", "precision")} == {
        "seed": 7, "batch_size": 3, "steps": 20, "model": "tiny", "precision": "fp32"
    }  # fmt: skip
    assert len(body["images"]) == 3
    assert all(_pixels(b).shape == (8, 8) for b in body["images"])
    assert set(body["timings"]) == {"queue_wait_s", "generation_s", "total_s"}
    assert body["timings"]["total_s"] >= body["timings"]["generation_s"] > 0


def test_default_chain(client: TestClient) -> None:
    """A request naming nothing gets the measured default (BENCHMARKS.md); naming ddpm alone, the paper's chain."""
    body = client.post("/generate", json={"seed": 1}).json()
    assert (body["sampler"], body["steps"], body["eta"]) == ("restart", 10, 0.0)
    assert client.post("/generate", json={"seed": 1, "sampler": "ddpm"}).json()["steps"] == 200


def test_png_and_npy(client: TestClient) -> None:
    r = client.post("/generate", json={"seed": 7, "batch_size": 4, "steps": 20}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    grid = np.asarray(Image.open(io.BytesIO(r.content)))
    assert grid.shape == (2 + 2 * 10, 2 + 2 * 10)  # 2x2 grid of 8x8 images, 2 px padding
    r = client.post("/generate", json={"seed": 7, "batch_size": 4, "steps": 20}, headers={"Accept": "application/x-npy"})
    arr = np.load(io.BytesIO(r.content))
    assert arr.shape == (4, 1, 8, 8) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    # the grid, the npy and the JSON images are the same pixels
    js = client.post("/generate", json={"seed": 7, "batch_size": 4, "steps": 20}).json()
    assert np.array_equal(_pixels(js["images"][3]), grid[12:20, 12:20])
    assert np.abs(np.round(arr[3, 0] * 255) - _pixels(js["images"][3])).max() <= 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"batch_size": 2}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 1, "batch_size": 0}, "batch_size"),
        ({"seed": 1, "batch_size": 17}, "batch_size"),
        ({"seed": 1, "batch_size": 10**30}, "batch_size"),
        ({"seed": 1, "steps": 0}, "steps"),
        ({"seed": 1, "steps": 201}, "steps"),
        ({"seed": 1, "clip_denoised": "maybe"}, "clip_denoised"),
        ({"seed": 1, "model": "/etc/passwd"}, "model"),
    ],
)
def test_bad_input_is_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]


def test_malformed_json(client: TestClient) -> None:
    r = client.post("/generate", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "detail" in r.json()


def test_schedule_matches_formulas(client: TestClient) -> None:
    body = client.get("/schedule").json()
    ref = make_schedule("linear", 200)
    assert body["num_timesteps"] == 200 and body["kind"] == "linear" and body["variance_type"] == "fixed_small"
    for name in ["betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_variance",
                 "posterior_mean_coef1", "posterior_mean_coef2"]:  # fmt: skip
        assert len(body[name]) == 200
        np.testing.assert_allclose(body[name], getattr(ref, name), rtol=1e-6, atol=1e-12)
    abar = np.cumprod(1 - np.array(body["betas"], dtype=np.float64))
    np.testing.assert_allclose(body["alphas_cumprod"], abar, rtol=1e-5)


def test_openapi_documents_the_contract(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/generate", "/generate/stream", "/schedule", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["seed"]["exclusiveMaximum"] == 2**63 and props["seed"]["minimum"] == 0


def test_web_page(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and 'fetch("generate/stream"' in r.text and "<progress" in r.text
    # its policy allows its own inline script by hash, and nothing else that runs code (a browser enforces it:
    # tests/test_web_page.py::test_the_pages_policy_blocks_a_script_it_did_not_ship)
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    script = r.text.split("<script>", 1)[1].split("</script>", 1)[0]
    assert policy["script-src"] == f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'" and r.headers["x-frame-options"] == "DENY"
    assert "unsafe-inline" not in policy["script-src"] and "'unsafe-eval'" not in r.headers["content-security-policy"]


def test_every_answer_says_its_content_type_is_not_to_be_sniffed(client: TestClient) -> None:
    for r in (client.get("/healthz"), client.post("/generate", json={"seed": 1, "steps": 2}, headers={"Accept": "image/png"}),
              client.post("/generate", json={"seed": "x"}), client.post("/generate", content=b"x" * 2_000_000)):  # fmt: skip
        assert r.headers["x-content-type-options"] == "nosniff", (r.status_code, r.headers)


def test_stream_progress_then_result(client: TestClient) -> None:
    with client.stream("POST", "/generate/stream", json={"seed": 3, "batch_size": 2, "steps": 150}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [block.split("\n")[0].removeprefix("event: ") for block in text.strip().split("\n\n")]
    assert events[0] == "queued" and events[-1] == "result"
    assert "progress" in events
    same = client.post("/generate", json={"seed": 3, "batch_size": 2, "steps": 150}).json()["images"]
    assert same[0] in text and same[1] in text


def test_stream_previews_come_before_the_result_and_only_on_the_stream(client: TestClient) -> None:
    """``previews: 2``: two preview events of each image (the model's x_0 so far: PNGs of the model's size) before the
    result, whose images are those of the request without previews; /generate refuses the field (it answers once)."""
    body = {"seed": 31, "batch_size": 2, "steps": 12}
    with client.stream("POST", "/generate/stream", json={**body, "previews": 2}) as r:
        text = "".join(r.iter_text())
    blocks = [block.split("\n") for block in text.strip().split("\n\n") if not block.startswith(":")]
    names = [lines[0].removeprefix("event: ") for lines in blocks]
    previews = [json.loads(lines[1].removeprefix("data: ")) for lines, name in zip(blocks, names, strict=True) if name == "preview"]
    assert sorted((p["image_index"], p["preview_index"]) for p in previews) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert names[-1] == "result" and max(i for i, n in enumerate(names) if n == "preview") < len(names) - 1
    assert all(_pixels(p["image"]).shape == (8, 8) for p in previews)
    result = json.loads(blocks[-1][1].removeprefix("data: "))
    assert result["images"] == client.post("/generate", json=body).json()["images"]
    r = client.post("/generate", json={**body, "previews": 1})
    assert r.status_code == 422 and "previews" in r.json()["detail"]
    assert client.post("/generate/stream", json={**body, "previews": 4}).status_code == 422  # at most 3


# --- reproducibility ----------------------------------------------------------------------------------


def test_image_k_does_not_depend_on_batch_size(client: TestClient) -> None:
    one = client.post("/generate", json={"seed": 7, "batch_size": 1, "steps": 30}).json()["images"]
    eight = client.post("/generate", json={"seed": 7, "batch_size": 8, "steps": 30}).json()["images"]
    again = client.post("/generate", json={"seed": 7, "batch_size": 1, "steps": 30}).json()["images"]
    assert one[0] == again[0]  # identical PNG bytes when run twice alone
    assert np.abs(_pixels(one[0]).astype(int) - _pixels(eight[0])).max() <= 1
    assert len({*eight}) == 8


def test_reproducible_under_concurrent_mixed_load(client: TestClient) -> None:
    alone = {s: client.post("/generate", json={"seed": s, "batch_size": 2, "steps": 40}).json()["images"] for s in (5, 6)}
    results: dict[int, list[str]] = {}

    def call(seed: int, steps: int, n: int) -> None:
        results[seed] = client.post("/generate", json={"seed": seed, "batch_size": n, "steps": steps}).json()["images"]

    threads = [threading.Thread(target=call, args=a) for a in [(100, 150, 3), (5, 40, 2), (101, 7, 4), (6, 40, 2), (102, 90, 1)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (5, 6):
        for a, b in zip(alone[s], results[s], strict=True):
            assert np.abs(_pixels(a).astype(int) - _pixels(b)).max() <= 1


# --- batching, backpressure, deadlines -------------------------------------------------------------------


def test_short_request_finishes_long_before_a_long_one(tmp_path: Path) -> None:
    long_model = save_tiny_model(tmp_path / "t1000")
    with app_client(long_model) as c:
        _wait_ready(c)
        done: dict[str, float] = {}
        start = time.monotonic()

        def call(name: str, steps: int) -> None:
            assert c.post("/generate", json={"seed": 1, "steps": steps}).status_code == 200
            done[name] = time.monotonic() - start

        long = threading.Thread(target=call, args=("long", 1000))
        long.start()
        while _metric(c, "ddpm_running_samples") < 1:
            time.sleep(0.005)
        call("short", 10)
        long.join()
    assert done["short"] < 0.5 * done["long"], done


def test_full_queue_is_503_with_retry_after(model_dir: Path) -> None:
    with app_client(model_dir, max_batch=1, max_resident=1, max_queue=2, retry_after_s=7) as c:
        _wait_ready(c)
        first = threading.Thread(target=lambda: c.post("/generate", json={"seed": 1, "batch_size": 2, "sampler": "ddpm"}))
        first.start()
        while _metric(c, "ddpm_running_samples") < 1:
            time.sleep(0.005)
        r = c.post("/generate", json={"seed": 2, "batch_size": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "7" and "queue full" in r.json()["detail"]
        first.join()
        assert _metric(c, 'ddpm_requests_total{code="503"}') == 1.0


def test_deadline_is_504_and_frees_the_batch(model_dir: Path) -> None:
    from service.engine.iteration_cost import IterationCost

    with app_client(model_dir, request_timeout_s=0.15) as c:
        _wait_ready(c)
        # a cost model that has measured nothing (a prediction that missed): measured, the request alone outlasts its
        # timeout and is refused up front (tests/test_scheduling.py); accepted, it runs into the timeout
        c.app.state.server.engine.cost = IterationCost()  # type: ignore[attr-defined]
        r = c.post("/generate", json={"seed": 1, "batch_size": 4, "sampler": "ddpm"})  # T = 200 steps
        assert r.status_code == 504 and "deadline" in r.json()["detail"]
        time.sleep(0.1)
        assert _metric(c, "ddpm_running_samples") == 0 and _metric(c, "ddpm_queue_depth") == 0


def test_readiness_during_startup_and_drain(model_dir: Path) -> None:
    from service.server_state import ServerState

    settings = Settings(model=model_dir, warmup_steps=1)
    state = ServerState(settings)
    app = create_app(settings, state)
    with TestClient(app) as c:
        state.wait_loaded()
        assert c.get("/readyz").status_code == 200
        state.drain()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "draining"
        assert c.get("/healthz").status_code == 200
        r = c.post("/generate", json={"seed": 1, "steps": 2})
        assert r.status_code == 503 and "Retry-After" in r.headers
    # which requests a draining replica still serves: the first of a connection accepted before its listeners closed
    now = time.monotonic()
    assert state.routed_before_drain(now, 1)  # the listeners not closed yet
    state.listeners_closed = now
    assert state.routed_before_drain(now - 1, 1) and not state.routed_before_drain(now + 1, 1)
    assert not state.routed_before_drain(now - 1, 2) and not state.routed_before_drain(None, None)


def test_the_gil_switch_interval_is_the_settings(model_dir: Path) -> None:
    from service.server_state import ServerState

    before = sys.getswitchinterval()
    try:
        state = ServerState(Settings(model=model_dir, warmup_steps=0, gil_switch_interval_ms=0.5))
        state.start_loading()
        state.wait_loaded(60)
        assert state.ready and sys.getswitchinterval() == pytest.approx(0.0005)
        state.shutdown()
    finally:
        sys.setswitchinterval(before)
    assert Settings().gil_switch_interval_ms == 5.0  # Python's own default: no change unless asked


def test_on_a_cpu_the_eager_warm_up_runs_every_step_variant_at_batch_1_and_only_the_unets_shapes_above(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eager path on a CPU runs no JIT, so every step variant runs at batch 1 (they prove the model runs) and at
    2 and max_batch only the U-Net's shapes (the plain chain; the guided one, twice the rows, for a conditional model):
    the other chains at 64 rows were 5.5 s of the shipped model's 13.7 s start on a 2-core AVX2 CPU."""
    from dataclasses import replace

    import torch

    from ddpm.model_source import load_model_source
    from service.engine.engine import Engine
    from service.server_state import ServerState
    from tests.tiny_model import save_tiny_conditional_model

    enqueue, warmed = Engine._enqueue, []
    monkeypatch.setattr(Engine, "_enqueue", lambda self, job: warmed.append(job.request) or enqueue(self, job))
    conditional = save_tiny_conditional_model(tmp_path / "cond", num_timesteps=50)
    for model, max_batch in ((model_dir, 8), (conditional, 6)):
        warmed.clear()
        state = ServerState(Settings(model=model, warmup_steps=1, max_batch=max_batch, compile="off"))
        state.start_loading()
        state.wait_loaded(60)
        assert state.ready
        state.shutdown()
        small = [(r.chain, r.edit is not None, r.labels is not None) for r in warmed if r.n == 1]
        assert len(small) >= 4 and len(set(small)) == len(small)  # plain, clipped, each multistep variant, inpainting
        shapes = [(small[0][0], False), *([(next(c for c, _, g in small if g), True)] if model == conditional else [])]
        for n in (2, max_batch):  # (the chain's kind: the plain one runs 2 steps at least there, its first call unmeasured)
            assert [(replace(r.chain, steps=0), r.labels is not None) for r in warmed if r.n == n] == [
                (replace(c, steps=0), g) for c, g in shapes], n  # fmt: skip
        assert {r.n for r in warmed} == {1, 2, max_batch}
    # compile auto: the eager path until the compile thread has built the graphs, which warms the rest (not started here)
    warmed.clear()
    state = ServerState(Settings(model=model_dir, warmup_steps=1, max_batch=8, compile="auto"))
    loaded = load_model_source(model_dir, "cpu")
    state._engine_on_hot_path(loaded, torch.device("cpu"), "f" * 64)
    state.switch.close()  # type: ignore[union-attr]
    assert len({r.chain for r in warmed if r.n == 1}) >= 4
    assert [replace(r.chain, steps=0) for r in warmed if r.n == 2] == [replace(small[0][0], steps=0)]
    assert {r.n for r in warmed} == {1, 2}


def test_not_ready_before_load_and_on_a_bad_model(tmp_path: Path) -> None:
    settings = Settings(model=tmp_path / "missing", warmup_steps=0)
    with TestClient(create_app(settings)) as c:
        end = time.monotonic() + 10
        while "failed" not in c.get("/readyz").json()["detail"]:
            assert time.monotonic() < end
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "model failed to load (see the server log)"
        assert str(tmp_path) not in r.text  # no filesystem path or exception text for anonymous callers
        assert c.post("/generate", json={"seed": 1}).status_code == 503
        assert c.get("/schedule").status_code == 503
        health = c.get("/healthz")  # it can never serve: a liveness probe must restart it
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "ddpm_ready 0.0" in c.get("/metrics").text


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_move_with_served_requests(model_dir: Path) -> None:
    # the call size fixed at max_batch: the counts below assume each request's rows in one call per iteration, and a
    # learned call size follows the warm-up's one timed call per size, which one noisy call can shrink (failed once)
    with app_client(model_dir, tune_call_size=False) as c:
        _wait_ready(c)
        assert _metric(c, "ddpm_images_generated_total") == 0  # warm-up is not counted
        for seed, n in [(1, 2), (2, 3)]:
            assert c.post("/generate", json={"seed": seed, "batch_size": n, "steps": 10}).status_code == 200
        assert c.post("/generate", json={"seed": -5}).status_code == 422
        text = c.get("/metrics").text
    assert sample_value(text, 'ddpm_requests_total{code="200",model="tiny"}') == 2.0
    assert sample_value(text, 'ddpm_requests_total{code="422",model="tiny"}') == 1.0
    assert sample_value(text, 'ddpm_images_generated_total{model="tiny"}') == 5.0
    assert sample_value(text, 'ddpm_request_duration_seconds_count{outcome="ok",model="tiny"}') == 2.0
    assert sample_value(text, 'ddpm_queue_wait_seconds_count{model="tiny"}') == 2.0
    # sequential requests: 10 iterations each, with 2 and 3 samples in the batch
    assert "ddpm_iteration_duration_seconds_count 20.0" in text
    assert "ddpm_batch_occupancy_sum 50.0" in text
    assert "ddpm_queue_depth 0.0" in text and "ddpm_running_samples 0.0" in text
    info = next(line for line in text.splitlines() if line.startswith("ddpm_model_info{"))
    assert 'compiled="false"' in info and 'device="cpu"' in info and 'step_backend="torch"' in info and "ddpm_ready 1.0" in text


def test_model_fault_fails_only_the_affected_requests(model_dir: Path) -> None:
    # faults are armed after warm-up: with every=25 the 25th U-Net call of the 30-step request fails
    with app_client(model_dir, fault_every_n_iterations=25, warmup_steps=1) as c:
        _wait_ready(c)
        r = c.post("/generate", json={"seed": 1, "steps": 30})
        assert r.status_code == 500 and r.json()["detail"].startswith("model call failed (InjectedFault)")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "recovering" in ready.json()["detail"]
        assert "ddpm_ready 0.0" in c.get("/metrics").text  # the gauge agrees with /readyz
        ok = c.post("/generate", json={"seed": 2, "steps": 10})  # no fault in these calls
        assert ok.status_code == 200
        assert c.get("/readyz").status_code == 200  # a good call makes it ready again
        text = c.get("/metrics").text
        assert sample_value(text, 'ddpm_requests_total{code="500"}') == 1
        assert sample_value(text, 'ddpm_request_duration_seconds_count{outcome="error"}') == 1
        assert 'ddpm_engine_faults_total{stage="unet"} 1.0' in text and "ddpm_ready 1.0" in text
