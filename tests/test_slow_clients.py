"""Slow clients against a real `ddpm serve`: trickled headers and bodies are cut off at
DDPM_REQUEST_READ_TIMEOUT_S (408), and connections beyond DDPM_MAX_CONNECTIONS get 503."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=50)
    s = ServerProcess(model, DDPM_REQUEST_READ_TIMEOUT_S="1", DDPM_MAX_CONNECTIONS="6")
    s.wait_ready()
    yield s
    s.stop()


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except TimeoutError:
        pass
    return b"".join(chunks)


def test_trickled_headers_are_cut_off(server: ServerProcess) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    start = time.monotonic()
    for s in socks:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
    for s in socks:
        s.sendall(b"X-Slow: 1\r\n")  # a byte now and then does not extend the deadline
    answers = [_read_all(s, timeout=5) for s in socks]
    assert time.monotonic() - start < 4
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    for s in socks:
        s.close()
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_a_silent_connection_is_closed(server: ServerProcess) -> None:
    s = socket.create_connection(("127.0.0.1", server.port))
    assert _read_all(s, timeout=5).startswith(b"HTTP/1.1 408 ")
    s.close()


def test_a_trickled_body_is_408(server: ServerProcess) -> None:
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{"seed": ')
    answer = _read_all(s, timeout=5)
    s.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 1 s" in answer


def test_connections_are_bounded(server: ServerProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]
    time.sleep(0.1)
    try:
        r = httpx.get(server.url + "/healthz", timeout=5)
        assert r.status_code == 503  # uvicorn's limit_concurrency: over DDPM_MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
