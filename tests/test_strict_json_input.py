"""Non-finite numbers and duplicate keys are 422 naming the field, and the 422 echo survives them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
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
