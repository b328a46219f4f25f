"""Bearer-token access, request ids, body-size and per-client limits, structured request logs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.request_log import JsonFormatter
from service.settings import Settings
from tests.app_client import wait_ready as _ready

TOKEN = "s3cret-token"


def _client(model_dir: Path, **overrides: object) -> TestClient:
    return TestClient(create_app(Settings(**{"model": model_dir, "warmup_steps": 1, **overrides})))  # type: ignore[arg-type]


@pytest.fixture
def secured(model_dir: Path) -> Iterator[TestClient]:
    with _client(model_dir, api_token=TOKEN) as c:
        yield _ready(c)


def test_token_required_on_work_routes(secured: TestClient) -> None:
    body = {"seed": 1, "steps": 3}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}]:
        r = secured.post("/generate", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
    assert secured.get("/schedule").status_code == 401
    assert secured.post("/generate/stream", json=body).status_code == 401
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert secured.post("/generate", json=body, headers=ok).status_code == 200
    assert secured.get("/schedule", headers=ok).status_code == 200
    # probes, metrics (by default) and the page stay open
    for path in ["/healthz", "/readyz", "/metrics", "/"]:
        assert secured.get(path).status_code == 200, path


def test_metrics_can_be_restricted_and_token_read_from_a_file(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    with _client(model_dir, api_token_file=tmp_path / "token", metrics_require_token=True) as c:
        _ready(c)
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_bad_token_file_fails_at_startup(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        create_app(Settings(model=model_dir, api_token_file=tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot read"):
        create_app(Settings(model=model_dir, api_token_file=tmp_path / "absent"))


def _secret_volume(root: Path, version: int, text: str) -> None:
    """A Kubernetes Secret volume as the kubelet updates it: the file is a link through ``..data``, and an update writes
    a new timestamped directory and swaps ``..data`` to it in one rename."""
    (root / f"..v{version}").mkdir(parents=True)
    (root / f"..v{version}" / "token").write_text(text)
    (root / "..data_tmp").symlink_to(f"..v{version}")
    (root / "..data_tmp").rename(root / "..data")
    if not (root / "token").is_symlink():
        (root / "token").symlink_to("..data/token")


def test_a_rotated_token_file_takes_effect_without_a_restart(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """The replica kept the token it started with: after the Secret's rotation, clients with the new token got 401 until
    it restarted. Now the file is followed (several tokens, one per line, for a rotation without a gap), and a write
    that leaves it empty or unreadable keeps the tokens accepted before (a warning), rather than opening or closing
    the server to everyone."""
    import service.api.auth

    monkeypatch.setattr(service.api.auth, "RECHECK_S", 0.0)  # the test does not wait out the once-a-second stat
    secret = tmp_path / "secret"
    _secret_volume(secret, 1, "old-token\n")

    def status(c: TestClient, token: str) -> int:
        return c.get("/schedule", headers={"Authorization": f"Bearer {token}"}).status_code

    with _client(model_dir, api_token_file=secret / "token") as c, caplog.at_level("INFO", logger="ddpm.server"):
        _ready(c)
        assert (status(c, "old-token"), status(c, "new-token")) == (200, 401)
        _secret_volume(secret, 2, "old-token\nnew-token\n")  # the rotation's first half: both
        assert (status(c, "old-token"), status(c, "new-token")) == (200, 200)
        _secret_volume(secret, 3, "new-token\n")  # the clients moved: the old one goes
        assert (status(c, "old-token"), status(c, "new-token")) == (401, 200)
        _secret_volume(secret, 4, "   \n")  # written empty, or caught half-way
        assert (status(c, "old-token"), status(c, "new-token"), status(c, "")) == (401, 200, 401)
        (secret / "..v4").rename(secret / "..gone")  # unreadable: the link dangles
        assert status(c, "new-token") == 200
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "DDPM_API_TOKEN_FILE" in r.getMessage()]
    assert said == [("INFO", f"DDPM_API_TOKEN_FILE {secret / 'token'} changed: 2 token(s) accepted now"),
                    ("INFO", f"DDPM_API_TOKEN_FILE {secret / 'token'} changed: 1 token(s) accepted now"),
                    ("WARNING", f"DDPM_API_TOKEN_FILE {secret / 'token'} is empty; the 1 token(s) read before stay accepted"),
                    ("WARNING", f"cannot read DDPM_API_TOKEN_FILE {secret / 'token'}: [Errno 2] No such file or directory: "
                                f"'{secret / 'token'}'; the 1 token(s) read before stay accepted")]  # fmt: skip


@pytest.fixture
def open_client(model_dir: Path) -> Iterator[TestClient]:
    with _client(model_dir, max_body_bytes=512, max_images_per_client=3, max_batch=1) as c:
        yield _ready(c)


def test_request_id_echoed_or_generated(open_client: TestClient) -> None:
    r = open_client.post("/generate", json={"seed": 1, "steps": 2}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = open_client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != open_client.get("/healthz").headers["x-request-id"]
    hostile = open_client.get("/healthz", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]
    assert hostile != "x" * 500 and len(hostile) == 32


def test_oversized_bodies_get_413(open_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    big = json.dumps({"seed": 1, "pad": "x" * 2000})
    r = open_client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "512" in r.json()["detail"] and r.headers["x-request-id"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"seed": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 100
        yield b'"}'

    r = open_client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # a client error: the access line says 413; nothing is logged as a server error
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info], caplog.text[:2000]
    assert [json.loads(JsonFormatter().format(rec))["status"] for rec in caplog.records if rec.name == "ddpm.access"] == [413, 413]


def test_images_per_client_are_bounded(open_client: TestClient) -> None:
    held = threading.Thread(target=lambda: open_client.post("/generate", json={"seed": 1, "batch_size": 3, "steps": 200}))
    held.start()
    end = time.monotonic() + 10
    while open_client.app.state.server.clients.held("testclient") < 3:  # type: ignore[attr-defined]
        assert time.monotonic() < end
        time.sleep(0.005)
    r = open_client.post("/generate", json={"seed": 2, "steps": 2})
    assert r.status_code == 429 and "Retry-After" in r.headers and "limit 3" in r.json()["detail"]
    held.join()
    assert open_client.post("/generate", json={"seed": 2, "steps": 2}).status_code == 200  # released


def test_one_structured_log_line_per_request(open_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ddpm.access"):
        open_client.post("/generate", json={"seed": 42, "batch_size": 2, "steps": 5}, headers={"X-Request-ID": "req-1"})
        open_client.post("/generate", json={"seed": -1})
        open_client.get("/healthz")
    records = [r for r in caplog.records if r.name == "ddpm.access"]
    assert len(records) == 2  # probes are not logged
    ok = json.loads(JsonFormatter().format(records[0]))
    assert ok["msg"] == "request" and ok["request_id"] == "req-1" and ok["status"] == 200
    assert (ok["seed"], ok["batch_size"], ok["steps"], ok["outcome"]) == (42, 2, 5, "ok")
    assert ok["path"] == "/generate" and ok["duration_s"] > 0
    assert json.loads(JsonFormatter().format(records[1]))["status"] == 422


HOSTILE_BODIES = {
    "long integer": b'{"seed": ' + b"9" * 5000 + b"}",  # over Python's int-string limit (4300 digits)
    "deep array": b"[" * 5000 + b"]" * 5000,
    "deep field": b'{"seed": ' + b"[" * 900 + b"]" * 900 + b"}",  # parses, but would overflow the validator's echo
    "not JSON": b'{"seed": ',
    "duplicate key": b'{"seed": 1, "seed": 2}',
    "NaN": b'{"seed": NaN}',
}
POST_ROUTES = ("/generate", "/generate/stream", "/v1/images/generations")


@pytest.mark.parametrize("name", HOSTILE_BODIES)
def test_the_token_is_checked_before_the_body_is_parsed(secured: TestClient, name: str) -> None:
    for route in POST_ROUTES:
        r = secured.post(route, content=HOSTILE_BODIES[name], headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (route, r.text[:200])


@pytest.mark.parametrize("name", HOSTILE_BODIES)
def test_hostile_bodies_are_4xx_without_a_traceback(secured: TestClient, name: str, caplog: pytest.LogCaptureFixture) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.INFO):
        for route in POST_ROUTES:
            r = secured.post(route, content=HOSTILE_BODIES[name], headers=headers)
            assert r.status_code in (400, 422), (route, r.status_code, r.text[:200])
            assert len(r.content) < 2000  # the echo of a 5000-digit or 900-deep input is not sent back
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info], caplog.text[:2000]
    assert 'code="500"' not in secured.get("/metrics").text


def test_a_browser_app_on_an_allowed_origin_may_call_the_api(model_dir: Path) -> None:
    """No CORS headers at all before: a front end on another origin (a dev server on :5173) could not read one answer.
    Now the origins DDPM_CORS_ALLOW_ORIGINS names get the preflight and the headers, on errors too; others get none."""
    app, other = "http://localhost:5173", "http://evil.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    with _client(model_dir, api_token=TOKEN, cors_allow_origins=f"{app}/, https://b.example") as c:
        _ready(c)
        ok = c.options("/generate", headers={"Origin": app, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == app
        assert {"authorization", "x-stainless-os"} <= set(ok.headers["access-control-allow-headers"].lower().split(", "))  # OpenAI's JS SDK
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "access-control-allow-origin" not in c.options("/generate", headers={"Origin": other, **preflight}).headers
        body = {"seed": 1, "batch_size": 1, "steps": 2}
        r = c.post("/generate", json=body, headers={"Origin": app, "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app
        assert {"etag", "x-request-id"} <= set(r.headers["access-control-expose-headers"].lower().split(", "))
        denied = c.post("/generate", json=body, headers={"Origin": app})  # the app reads the 401, not a network error
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == app
        too_big = c.post("/generate", content=b"x" * (1 << 20), headers={"Origin": app, "Content-Type": "application/json"})
        assert too_big.status_code == 413 and too_big.headers["access-control-allow-origin"] == app  # the request middleware's own
    with _client(model_dir) as c:  # the default: no CORS headers
        _ready(c)
        assert "access-control-allow-origin" not in c.post("/generate", json=body, headers={"Origin": app}).headers
    with pytest.raises(ValueError, match="'localhost:5173' is not an origin"):
        Settings(cors_allow_origins="localhost:5173")
