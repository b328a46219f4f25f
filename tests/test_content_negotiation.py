"""Accept negotiation (RFC 9110): q-values, wildcards and specificity, and 406 over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.content_negotiation import negotiate
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
