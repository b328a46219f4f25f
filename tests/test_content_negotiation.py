"""Accept negotiation (RFC 9110): q-values, wildcards and specificity, and 406 over HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.content_negotiation import negotiate
from tests.app_client import metric as _metric


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
