"""service.client and ``ddpm generate`` against a server that misbehaves on purpose (a raw socket
server on loopback): stalls, trickles, endless streams, huge bodies, garbage and bad headers each end
in a ClientError with a message, within the call's deadline and the client's memory bound."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import httpx
import pytest

from service import client as client_module
from service.client import (
    AsyncClient,
    BadAnswer,
    CallTimeout,
    Client,
    ClientError,
    ServerError,
    Unreachable,
    parse_retry_after,
)

Behaviour = Callable[[socket.socket], None]


class MisbehavingServer:
    """Accepts connections on loopback; each is handed, after its request was read, to ``behaviour``."""

    def __init__(self) -> None:
        self.behaviour: Behaviour = lambda conn: None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.behaviour(conn)
            except OSError:  # the client gave up: what these tests want
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def bad_server() -> Iterator[MisbehavingServer]:
    server = MisbehavingServer()
    yield server
    server.close()


def _head(status: str = "200 OK", content_type: str = "application/json", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n{extra}connection: close\r\n".encode()


def _answer(body: bytes, status: str = "200 OK", content_type: str = "application/json", extra: str = "") -> Behaviour:
    return lambda conn: conn.sendall(_head(status, content_type, extra) + f"content-length: {len(body)}\r\n\r\n".encode() + body)


def _stall(conn: socket.socket) -> None:
    time.sleep(20)


def _trickle(conn: socket.socket) -> None:
    conn.sendall(_head() + b"content-length: 1000000\r\n\r\n")
    for _ in range(400):
        conn.sendall(b" ")
        time.sleep(0.05)


def _endless_stream(conn: socket.socket) -> None:
    conn.sendall(_head(content_type="text/event-stream") + b"transfer-encoding: chunked\r\n\r\n")
    event = b'event: progress\ndata: {"steps_done": 1, "total": 2}\n\n'
    chunk = b"%x\r\n%s\r\n" % (len(event) * 50, event * 50)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        conn.sendall(chunk)
        time.sleep(0.001)


def _huge_chunked(conn: socket.socket) -> None:
    conn.sendall(_head() + b"transfer-encoding: chunked\r\n\r\n")
    block = b'{"images": ["' + b"A" * (1 << 20)
    for _ in range(400):  # 400 MB if nobody stops it
        conn.sendall(b"%x\r\n%s\r\n" % (len(block), block))


def _timed(call: Callable[[], object]) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(ClientError) as raised:
        call()
    return raised.value, time.monotonic() - start


@pytest.mark.parametrize("behaviour", [_stall, _trickle], ids=["stall", "trickle"])
def test_a_stalled_or_trickling_server_is_cut_off_at_the_call_deadline(bad_server: MisbehavingServer, behaviour: Behaviour) -> None:
    bad_server.behaviour = behaviour
    with Client(bad_server.url, timeout_s=1.0, max_retries=0) as client:
        error, seconds = _timed(lambda: client.generate(0, 1))
    assert isinstance(error, CallTimeout) and "within 1 s" in str(error) and 0.9 <= seconds < 2.5, (error, seconds)


def test_an_endless_stream_is_cut_off(bad_server: MisbehavingServer) -> None:
    bad_server.behaviour = _endless_stream
    events: list[str] = []
    with Client(bad_server.url, timeout_s=1.0, max_retries=0) as client:  # by the deadline ...
        error, seconds = _timed(lambda: client.generate(0, 1, on_event=lambda name, _: events.append(name)))
    assert isinstance(error, CallTimeout) and seconds < 2.5 and len(events) > 100
    with Client(bad_server.url, timeout_s=30.0, max_retries=0, max_events=1000) as client:  # ... or by the event bound
        error, seconds = _timed(lambda: client.generate(0, 1, on_event=lambda *_: None))
    assert isinstance(error, BadAnswer) and "over 1000 events" in str(error) and seconds < 10


def test_a_huge_answer_is_refused_as_it_arrives(bad_server: MisbehavingServer) -> None:
    limit = 8 * 2**20
    # a declared length over the limit is refused before the body is read
    bad_server.behaviour = lambda conn: conn.sendall(_head() + b"content-length: 400000000\r\n\r\n" + b"{" * 65536)
    with Client(bad_server.url, timeout_s=30.0, max_retries=0, max_response_bytes=limit) as client:
        error, seconds = _timed(lambda: client.generate(0, 1))
    assert isinstance(error, BadAnswer) and "400000000 bytes" in str(error) and seconds < 5
    bad_server.behaviour = _huge_chunked  # no length up front: counted as it arrives
    tracemalloc.start()
    try:
        with Client(bad_server.url, timeout_s=60.0, max_retries=0, max_response_bytes=limit) as client:
            error, _ = _timed(lambda: client.generate(0, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(error, BadAnswer) and f"limit of {limit} bytes" in str(error)
    assert peak < 4 * limit, peak  # bounded by the limit, not by the 400 MB on offer


GARBAGE = {
    "not JSON": _answer(b"<html>oops</html>"),
    "a JSON list": _answer(b"[1, 2]"),
    "no images": _answer(b'{"seed": 0}'),
    "images not a list": _answer(b'{"images": 5}'),
    "bad base64": _answer(b'{"images": ["@@@not base64@@@"]}'),
    "an error with HTML": _answer(b"<h1>502 Bad Gateway</h1>", status="502 Bad Gateway", content_type="text/html"),
    "an error in OpenAI's shape": _answer(b'{"error": {"message": "nope", "type": "x"}}', status="400 Bad Request"),
    "a broken HTTP answer": lambda conn: conn.sendall(b"HTTP/1.1 abc\r\n\r\n"),
    "closed without an answer": lambda conn: None,
}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_is_one_error_type_with_a_message(bad_server: MisbehavingServer, name: str) -> None:
    bad_server.behaviour = GARBAGE[name]
    with Client(bad_server.url, timeout_s=10.0, max_retries=0) as client:
        error, _ = _timed(lambda: client.generate(0, 1))
    assert str(error)
    expected = {"an error with HTML": ServerError, "an error in OpenAI's shape": ServerError, "a broken HTTP answer": Unreachable,
                "closed without an answer": Unreachable}.get(name, BadAnswer)  # fmt: skip
    assert isinstance(error, expected), (name, type(error), error)
    if name == "an error in OpenAI's shape":
        assert isinstance(error, ServerError) and error.status == 400 and error.detail == "nope"
    if name == "an error with HTML":
        assert isinstance(error, ServerError) and error.status == 502 and "Bad Gateway" in error.detail


@pytest.mark.parametrize(
    "stream",
    [
        b"event: progress\ndata: {not json\n\n",
        b'event: result\ndata: {"seed": 0}\n\n',
        b'event: result\ndata: {"images": ["%%%"]}\n\n',
        b'event: error\ndata: {"status": "x", "detail": "odd"}\n\n',
        b"event: queued\ndata: {}\n\n",  # ends without a result
    ],
)
def test_a_malformed_stream_is_a_client_error(bad_server: MisbehavingServer, stream: bytes) -> None:
    bad_server.behaviour = _answer(stream, content_type="text/event-stream")
    with Client(bad_server.url, timeout_s=10.0, max_retries=0) as client:
        error, _ = _timed(lambda: client.generate(0, 1, on_event=lambda *_: None))
    assert isinstance(error, ClientError) and str(error)
    if b'"status": "x"' in stream:
        assert isinstance(error, ServerError) and error.status == 500 and error.detail == "odd"


def test_retry_after_is_parsed_as_rfc_9110_says() -> None:
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("Mon, 30 Nov 2026 12:00:07 GMT", now) == 7.0
    assert parse_retry_after("Mon, 30 Nov 2026 11:00:00 GMT", now) == 0.0  # in the past: now
    for bad in ("nan", "NaN", "-1", "1.5", "inf", "1e3", "", "soon", "٣", None):  # ٣: an Arabic-Indic digit
        assert parse_retry_after(bad) is None, bad


@pytest.mark.parametrize("header", ["nan", "-1", "inf", "99999999999999999999", "Thu, 01 Jan 1970 00:00:00 GMT"])
def test_a_bad_retry_after_falls_back_to_backoff(monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    slept: list[float] = []

    async def fake_pause(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(client_module, "_pause", fake_pause)
    answers = [httpx.Response(503, headers={"Retry-After": header}, json={"detail": "busy"}),
               httpx.Response(200, json={"seed": 0, "images": [base64.b64encode(b"png").decode()]})]  # fmt: skip
    transport = httpx.MockTransport(lambda request: answers.pop(0))
    with Client("http://x", transport=transport, max_wait_s=60.0) as client:
        assert client.generate(0, 1).pngs == [b"png"]
    expected = {"nan": 0.5, "-1": 0.5, "inf": 0.5, "99999999999999999999": 60.0}.get(header, 0.0)
    assert slept == [expected]


def test_the_async_client_has_the_same_deadline(bad_server: MisbehavingServer) -> None:
    bad_server.behaviour = _trickle

    async def run() -> None:
        async with AsyncClient(bad_server.url, timeout_s=1.0, max_retries=0) as client:
            await client.generate(0, 1)

    error, seconds = _timed(lambda: asyncio.run(run()))
    assert isinstance(error, CallTimeout) and seconds < 2.5


def test_the_sync_client_works_inside_a_running_loop(bad_server: MisbehavingServer) -> None:
    bad_server.behaviour = _answer(b'{"seed": 0, "images": []}')

    async def from_a_notebook() -> int:
        with Client(bad_server.url, timeout_s=5.0) as client:
            return len(client.generate(0, 1).pngs)

    assert asyncio.run(from_a_notebook()) == 0


def test_ddpm_generate_has_a_timeout(bad_server: MisbehavingServer, tmp_path: object) -> None:
    bad_server.behaviour = _stall
    cmd = [sys.executable, "-m", "commands.main", "generate", "--url", bad_server.url, "--timeout", "1", "--retries", "0", "--quiet",
           "-o", str(tmp_path) + "/x.png"]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "DDPM_API_TOKEN": ""})
    assert done.returncode != 0 and "within 1 s" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - start < 30  # the interpreter's start-up included
