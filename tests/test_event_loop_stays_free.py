"""The event loop is never the bottleneck: a stalled stream reader holds one progress event, and
encoding (PNG, npy, JSON) runs off the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi.testclient import TestClient

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from service.api.job_handle import JobHandle
from service.engine.job import Job


def test_a_stalled_stream_reader_holds_one_progress_event() -> None:
    async def scenario() -> int:
        job = Job(ImageRequest(0, 1, ChainSpec(steps=1000, clip=True)), timeout_s=60)
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
        ("service.api.output_format", "image_files", "/v1/images/generations", {"prompt": "x", "seed": 1, "steps": 2}, {}),
    ],
)
def test_encoding_runs_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, module_name: str, encoder: str, path: str, body: dict, headers: dict
) -> None:
    import importlib

    module = importlib.import_module(module_name)
    threads: list[str] = []
    real = getattr(module, encoder)

    def spy(images, *args):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(images, *args)

    monkeypatch.setattr(module, encoder, spy)
    assert client.post(path, json=body, headers=headers).status_code == 200
    assert threads and threads[0] != "MainThread" and not threads[0].startswith("AnyIO")
