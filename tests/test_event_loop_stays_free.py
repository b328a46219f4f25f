"""The event loop is never the bottleneck: a stalled stream reader holds one progress event, and
encoding (PNG, npy, JSON) runs off the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ddpm.chain import ChainSpec
from service.api.app import create_app
from service.engine.job import Job
from service.engine.job_handle import JobHandle
from service.server_state import ServerState
from service.settings import Settings
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
