"""Non-finite numbers and duplicate keys are 422 naming the field, and the 422 echo survives them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app_client import metric as _metric


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


@pytest.mark.parametrize("route", ["/generate", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b'{"seed": 1, "sampler": "\xff"}', "UTF-8: invalid start byte at byte 24"),
        ('{"seed": 1}'.encode("utf-16-le")[:-1], "UTF-16-LE: truncated data"),  # json.loads reads UTF-16 by its zero bytes
    ],
)
def test_a_body_that_is_not_text_is_422_saying_so(client: TestClient, route: str, raw: bytes, said: str) -> None:
    """Not "a number in the JSON is too long", as a UnicodeDecodeError (a ValueError) was reported before."""
    r = client.post(route, content=raw, headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"] if route.startswith("/v1/") else r.json()["detail"]
    assert r.status_code == 422 and "does not decode as text" in message and said in message and "number" not in message, r.text


@pytest.mark.parametrize("route", ["/generate", "/v1/images/generations"])
def test_a_body_in_a_content_coding_is_415_not_parsed(client: TestClient, route: str) -> None:
    """A gzip body was parsed as JSON ("the body does not decode as text"), and a plain body labelled ``br`` was taken:
    this server decodes no content coding, so it says so (RFC 9110 15.5.16)."""
    import gzip
    import json

    body = {"seed": 1, "steps": 2} if route == "/generate" else {"prompt": "x", "seed": 1, "steps": 2}
    raw = json.dumps(body).encode()
    for coding, content in (("gzip", gzip.compress(raw)), ("br", raw)):
        r = client.post(route, content=content, headers={"Content-Type": "application/json", "Content-Encoding": coding})
        said = f"Content-Encoding {coding} is not supported: send the body uncompressed"
        assert r.status_code == 415 and said in r.text, r.text
    assert client.post(route, content=raw, headers={"Content-Type": "application/json", "Content-Encoding": "identity"}).status_code == 200


@pytest.mark.parametrize("route", ["/generate", "/generate/stream", "/v1/images/generations"])
@pytest.mark.parametrize(("raw", "field"), [
    (rb'{"seed": 1, "sampler": "\udce9t\udce9"}', "sampler"),
    (rb'{"seed": 1, "class_label": ["a", "\ud800"]}', "class_label.1"),
    (rb'{"seed": 1, "\udce9": 2}', "\\udce9"),  # a key: the 422 for a field this API lacks echoed it
])  # fmt: skip
def test_a_lone_surrogate_escape_is_422_not_a_500(client: TestClient, route: str, raw: bytes, field: str) -> None:
    """``"\\udce9"`` alone is JSON syntax but no character: Python kept it, the 422 echoing it failed to encode as UTF-8,
    and the answer was a 500 ("internal server error", measured on a real ``ddpm serve``)."""
    before = _metric(client, 'ddpm_requests_total{code="500"}')
    body = raw if route != "/v1/images/generations" else raw.replace(b"{", b'{"prompt": "x", ', 1)
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    message = r.json()["error"]["message"] if route.startswith("/v1/") else r.json()["detail"]
    assert r.status_code == 422 and message.startswith(f"{field}: holds a \\uD800-\\uDFFF escape without its pair"), r.text
    assert _metric(client, 'ddpm_requests_total{code="500"}') == before
