"""Helpers for tests that drive the app through FastAPI's TestClient (no side effects on import)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient


def wait_ready(client: TestClient, timeout: float = 30.0) -> TestClient:
    """Poll /readyz until 200; fails with its last answer after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").json()
        time.sleep(0.02)
    return client


def metric(client: TestClient, name: str) -> float:
    """One sample of /metrics by its full name (labels included), 0 when absent."""
    for line in client.get("/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
