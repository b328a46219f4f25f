"""The SSE stream while a request waits: its queue position in `queued` events as it moves up, and
keep-alive comments when nothing else is sent (proxies drop silent connections)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service.client import SSEReader
from tests.app_client import app_client, metric, wait_ready
from tests.tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=1000)


def test_queue_position_and_keepalives(model_dir: Path) -> None:
    with app_client(model_dir, compile="off", max_batch=1, max_resident=1, sse_keepalive_s=0.2, response_cache_mb=0) as c:
        wait_ready(c)
        # two 1000-step images ahead, one slot: the second waits for the first, the stream for both
        first = threading.Thread(target=lambda: c.post("/generate", json={"seed": 1, "batch_size": 2, "sampler": "ddpm"}))
        first.start()
        while metric(c, "ddpm_running_samples") < 1:
            time.sleep(0.005)
        lines, events, stamps = [], [], []
        reader = SSEReader()
        start = time.monotonic()
        with c.stream("POST", "/generate/stream", json={"seed": 2, "steps": 20, "sampler": "ddim"}) as s:
            for line in s.iter_lines():
                lines.append(line)
                stamps.append(time.monotonic() - start)
                event = reader.feed(line)
                if event is not None:
                    events.append(event)
        first.join()
    names = [name for name, _ in events]
    queued = [data for name, data in events if name == "queued"]
    # 1 image ahead (the first request's second image), then 0 once that one started
    assert [q["images_ahead"] for q in queued] == [1, 0], queued
    assert names[: len(queued)] == ["queued"] * len(queued) and names[-1] == "result" and "progress" in names
    keepalives = [i for i, line in enumerate(lines) if line == ": keep-alive"]
    assert len(keepalives) >= 2, lines[:20]
    # they come while the request waits, no closer together than the setting
    gaps = [b - a for a, b in zip([stamps[i] for i in keepalives], [stamps[i] for i in keepalives[1:]], strict=False)]
    assert all(g >= 0.15 for g in gaps), gaps
    first_progress = next(i for i, line in enumerate(lines) if line == "event: progress")
    assert keepalives[0] < first_progress


def test_sse_reader_skips_comments_and_joins_data_lines() -> None:
    reader = SSEReader()
    out = [reader.feed(line) for line in [": keep-alive", "", "event: progress", 'data: {"a":', "data: 1}", ""]]
    assert out == [None, None, None, None, None, ("progress", {"a": 1})]
