"""Slow and idle clients against a real `ddpm serve`: trickled headers and bodies, and connections that
send nothing, are cut off at DDPM_REQUEST_READ_TIMEOUT_S (408, counted); connections beyond
DDPM_MAX_CONNECTIONS get 503 except the probes and /metrics; an answer nobody received counts 499."""

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
    time.sleep(0.2)
    assert "unhandled error" not in server.output() and "Traceback" not in server.output()  # a client error, not the server's


def test_connections_are_bounded_but_probes_still_answer(server: ServerProcess) -> None:
    """DDPM_MAX_CONNECTIONS idle sockets (no request sent) must not fail the liveness probe: the
    orchestrator would restart the replica and lose its work. Generation is refused, probes are not."""
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]
    time.sleep(0.1)
    try:
        assert server.metric("ddpm_http_connections") >= 7  # the six and this scrape's own
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(server.url + path, timeout=5).status_code == 200, path
        r = httpx.post(server.url + "/generate", json={"seed": 0, "steps": 2}, timeout=5)
        assert r.status_code == 503  # over DDPM_MAX_CONNECTIONS (uvicorn's limit_concurrency)
        assert httpx.get(server.url + "/schedule", timeout=5).status_code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert httpx.post(server.url + "/generate", json={"seed": 0, "steps": 2}, timeout=30).status_code == 200


def test_idle_connections_are_closed_at_the_deadline_and_counted(server: ServerProcess) -> None:
    before = server.metric('ddpm_http_connection_deadlines_total{reason="idle"}')
    partial_before = server.metric('ddpm_http_connection_deadlines_total{reason="headers"}')
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    start = time.monotonic()
    answers = [_read_all(s, timeout=5) for s in idle]
    assert time.monotonic() - start < 4 and all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    for s in idle:
        s.close()
    server.wait_metric('ddpm_http_connection_deadlines_total{reason="idle"}', lambda v: v >= before + 3, timeout=5)
    assert server.metric('ddpm_http_connection_deadlines_total{reason="headers"}') == partial_before


def test_an_answer_nobody_received_is_counted_499(server: ServerProcess) -> None:
    """A client that sends its request and closes (or half-closes: TCP cannot tell them apart) is gone,
    as uvicorn and nginx treat it; an answer produced anyway (here from the response cache, at once) is
    counted 499 in the access log and the metrics, not 200."""
    body = b'{"seed": 1, "steps": 3, "sampler": "ddim"}'
    assert httpx.post(server.url + "/generate", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    codes = ('ddpm_requests_total{code="200"}', 'ddpm_requests_total{code="499"}')
    outcomes = []
    # the cached answer is at once: on a loaded machine the server can write it before the FIN reaches it, and
    # then 200 is the truth (it went out). Each try is counted exactly once, as one or the other; one 499 must come.
    for _ in range(5):
        before = [server.metric(name) for name in codes]
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        s.shutdown(socket.SHUT_WR)
        s.close()
        server.wait_metric(codes[0], lambda v, b=before: v + server.metric(codes[1]) == sum(b) + 1, timeout=10)
        outcomes.append(200 if server.metric(codes[0]) == before[0] + 1 else 499)
        if outcomes[-1] == 499:
            break
    assert outcomes[-1] == 499, f"every answer was counted 200: {outcomes}"


def test_head_is_answered_wherever_get_is_with_the_gets_headers_and_no_body(server: ServerProcess) -> None:
    """RFC 9110 9.1: a load balancer's health check may be ``HEAD /healthz`` (405 before). On one keep-alive
    connection: HEADs answer with the GET's status and Content-Length and no body (the GET after them is read
    intact: a body sent for a HEAD would be read as the next response), and a POST route still says 405."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        def exchange(method: str, path: str) -> tuple[str, dict[str, str], bytes]:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(4096)
            head, rest = data.split(b"\r\n\r\n", 1)
            status, *lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
            length = 0 if method == "HEAD" else int(headers["content-length"])
            while len(rest) < length:
                rest += sock.recv(4096)
            return status, headers, rest

        sock.settimeout(10)
        for path in ("/healthz", "/readyz", "/info", "/metrics", "/schedule"):
            status, headers, body = exchange("HEAD", path)
            assert status.startswith("HTTP/1.1 200") and body == b"", (path, status, body[:100])
            got_status, got, got_body = exchange("GET", path)
            assert got_status.startswith("HTTP/1.1 200") and len(got_body) == int(got["content-length"]), path
            if path not in ("/metrics", "/info"):  # those two change between the calls (counters, the hot path)
                assert headers["content-length"] == got["content-length"] and headers["content-type"] == got["content-type"], path
        status, headers, body = exchange("HEAD", "/generate")
        assert status.startswith("HTTP/1.1 405") and headers["allow"] == "POST" and body == b""
        assert exchange("GET", "/healthz")[0].startswith("HTTP/1.1 200")  # the connection is still in step


def test_the_absolute_form_target_is_served_as_its_path(server: ServerProcess) -> None:
    """RFC 9112 3.2.2: a server MUST accept ``GET http://host/path`` (what a client sends to a proxy): every route
    answered 404, since uvicorn hands the whole target over as the path. A probe sent so still passes the
    connection limit, and the access log and the metrics see the path."""

    def ask(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            return _read_all(sock, 10)

    body = b'{"seed": 3, "steps": 2}'
    answer = ask(b"POST HTTP://elsewhere.example:8080/generate?x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 422") and b"query" in answer.lower(), answer[:300]  # the query string kept apart, refused
    before = server.metric('ddpm_http_responses_total{code="200",route="/readyz"}')
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]  # DDPM_MAX_CONNECTIONS
    time.sleep(0.1)
    try:
        assert ask(b"GET http://elsewhere.example/readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        for s in idle:
            s.close()
    assert server.metric('ddpm_http_responses_total{code="200",route="/readyz"}') == before + 1
    generated = ask(b"POST https://elsewhere.example/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
    assert generated.startswith(b"HTTP/1.1 200") and b'"seed":3' in generated, generated[:300]


def test_a_body_cut_short_is_the_clients_not_a_server_error(server: ServerProcess) -> None:
    """A client that leaves mid-upload (a cancelled edit from a phone), or whose chunked body uvicorn refuses with a
    400 of its own, was logged as an unhandled error with a traceback and counted 500: a 5xx alert anyone could fire.
    Now 499 (the client left) and 400 (the protocol's answer), without the traceback."""
    errors, gone, refused = (server.metric(f'ddpm_requests_total{{code="{c}"}}') for c in (500, 499, 400))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"seed": 1')
        time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b'Content-Length: 1000\r\n\r\n--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n')  # fmt: skip
        time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b'5\r\n{"see\r\nzz\r\n')  # fmt: skip
        assert _read_all(sock, 5).startswith(b"HTTP/1.1 400")
    server.wait_metric('ddpm_requests_total{code="400"}', lambda v: v == refused + 1)
    server.wait_metric('ddpm_requests_total{code="499"}', lambda v: v == gone + 2)
    assert server.metric('ddpm_requests_total{code="500"}') == errors and "unhandled error" not in server.output()
