"""Helpers for tests that drive the app through FastAPI's TestClient (no side effects on import)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi.testclient import TestClient

from tests.prometheus_text import sample_value

if TYPE_CHECKING:
    from service.server_state import ServerState


def app_client(model_dir: Path, **overrides: object) -> TestClient:
    """A TestClient of the app on ``model_dir`` with test-friendly settings (1 warm-up step, batch 8)."""
    return app_and_state(model_dir, **overrides)[0]


def app_and_state(model_dir: Path, **overrides: object) -> tuple[TestClient, ServerState]:
    """``app_client`` and the server state behind it (for tests that reach into the engine)."""
    from service.api.app import create_app
    from service.server_state import ServerState
    from service.settings import Settings

    settings = Settings(**{"model": model_dir, "warmup_steps": 1, "max_batch": 8, **overrides})  # type: ignore[arg-type]
    state = ServerState(settings)
    return TestClient(create_app(settings, state)), state


def wait_ready(client: TestClient, timeout: float = 30.0) -> TestClient:
    """Poll /readyz until 200; fails with its last answer after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").json()
        time.sleep(0.02)
    return client


def metric(client: TestClient, name: str) -> float:
    """A value of /metrics by name and labels (``tests.prometheus_text.sample_value``), 0 when absent."""
    return sample_value(client.get("/metrics").text, name)
