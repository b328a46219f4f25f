"""`ddpm serve` as a real process on loopback: client disconnects and SIGTERM draining."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def model_1000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny1000")


@pytest.fixture
def server(model_1000: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(model_1000)
    s.wait_ready()
    yield s
    s.stop()


def test_client_disconnect_frees_its_samples(server: ServerProcess) -> None:
    body = json.dumps({"seed": 1, "batch_size": 4, "steps": 1000}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    server.wait_metric("ddpm_running_samples", lambda v: v == 4)
    iterations_before = server.metric("ddpm_iterations_total")
    sock.close()
    server.wait_metric("ddpm_running_samples", lambda v: v == 0, timeout=5)
    assert server.metric("ddpm_iterations_total") - iterations_before < 900  # it left long before its chain ended
    server.wait_metric('ddpm_requests_total{code="499"}', lambda v: v == 1)
    assert server.metric("ddpm_images_generated_total") == 0


def test_sigterm_drains_in_flight_work(server: ServerProcess) -> None:
    result: dict[str, httpx.Response] = {}

    def long_request() -> None:
        result["r"] = httpx.post(server.url + "/generate", json={"seed": 2, "batch_size": 2, "steps": 400}, timeout=60)

    t = threading.Thread(target=long_request)
    t.start()
    server.wait_metric("ddpm_running_samples", lambda v: v == 2)
    with httpx.Client(base_url=server.url) as open_connection:
        assert open_connection.get("/readyz").status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5
        while open_connection.get("/readyz").status_code != 503:  # a connection opened before the signal
            assert time.monotonic() < end
            time.sleep(0.02)
        refused = open_connection.post("/generate", json={"seed": 3, "steps": 5}, timeout=10)
        assert refused.status_code == 503 and "Retry-After" in refused.headers
    with pytest.raises(httpx.ConnectError):  # new connections are refused: a load balancer fails over
        httpx.get(server.url + "/readyz", timeout=2)
    t.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 2
    assert server.proc.wait(30) == 0


def test_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm.cli", "serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "model directory not found" in proc.stderr
