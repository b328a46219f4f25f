"""`ddpm serve` as a real process on loopback: client disconnects and SIGTERM draining."""

from __future__ import annotations

import http.client
import json
import os
import select
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

from ddpm.inference_compile import cpu_compiler_available
from tests.command_in_process import WITHOUT_TORCH
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


def _send_and_wait_running(server: ServerProcess, body: bytes, rows: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    server.wait_metric("ddpm_running_samples", lambda v: v == rows)
    return sock


def test_client_disconnect_frees_its_samples(model_1000: Path) -> None:
    server = ServerProcess(model_1000, DDPM_RETRY_GRACE_S="0")  # cancelled at once (the default grace: below)
    try:
        server.wait_ready()
        sock = _send_and_wait_running(server, json.dumps({"seed": 1, "batch_size": 4, "steps": 1000}).encode(), 4)
        iterations_before = server.metric("ddpm_iterations_total")
        sock.close()
        server.wait_metric("ddpm_running_samples", lambda v: v == 0, timeout=5)
        assert server.metric("ddpm_iterations_total") - iterations_before < 900  # it left long before its chain ended
        server.wait_metric('ddpm_requests_total{code="499"}', lambda v: v == 1)
        assert server.metric("ddpm_images_generated_total") == 0
    finally:
        server.stop()


def test_a_retry_within_the_grace_finds_its_first_try_running(server: ServerProcess) -> None:
    """A client that gives up (its own timeout) and sends the request again: the first try's job runs on for
    DDPM_RETRY_GRACE_S (2 s) after its client left, and the retry shares it instead of starting over; a job nobody
    comes back for leaves after the grace."""
    body = {"seed": 5, "batch_size": 4, "steps": 1000}
    sock = _send_and_wait_running(server, json.dumps(body).encode(), 4)
    sock.close()
    server.wait_metric('ddpm_requests_total{code="499"}', lambda v: v == 1)  # the server saw it leave
    retry = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert retry.status_code == 200 and retry.headers["x-cache"] == "shared"
    assert server.metric('ddpm_requests_total{code="499"}') == 1 and server.metric("ddpm_images_generated_total") == 4
    abandoned = _send_and_wait_running(server, json.dumps({**body, "seed": 6}).encode(), 4)
    left = time.monotonic()
    abandoned.close()
    server.wait_metric("ddpm_running_samples", lambda v: v == 0, timeout=10)
    assert time.monotonic() - left >= 2.0 and server.metric("ddpm_images_generated_total") == 4  # ran the grace, then left


def test_a_job_that_ends_in_the_grace_answers_the_retry_from_the_cache(model_1000: Path) -> None:
    """The first try's job may end while nobody waits on it (its client gone, the retry not come yet): its images go to
    the response cache all the same (found by a probe with the openai client: they were lost, and the retry started over)."""
    server = ServerProcess(model_1000, DDPM_RETRY_GRACE_S="60")
    try:
        server.wait_ready()
        body = {"seed": 8, "batch_size": 4, "steps": 1000}
        _send_and_wait_running(server, json.dumps(body).encode(), 4).close()
        server.wait_metric('ddpm_requests_total{code="499"}', lambda v: v == 1)
        server.wait_metric("ddpm_images_generated_total", lambda v: v == 4, timeout=60)  # ended with nobody waiting
        retry = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert retry.status_code == 200 and retry.headers["x-cache"] == "hit"
    finally:
        server.stop()


def test_sigterm_drains_in_flight_work(server: ServerProcess) -> None:
    result: dict[str, httpx.Response] = {}

    def long_request() -> None:
        result["r"] = httpx.post(server.url + "/generate", json={"seed": 2, "batch_size": 2, "steps": 400}, timeout=60)

    t = threading.Thread(target=long_request)
    t.start()
    server.wait_metric("ddpm_running_samples", lambda v: v == 2)
    # a connection a load balancer opened before the signal and sends its request on after it (nginx does not
    # re-send a POST that reached a replica): the replica serves that first request, not a 503 that loses it
    routed = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    routed.connect()
    # accepted by the server, not only by the kernel: the long request's, this scrape's and this one
    server.wait_metric("ddpm_http_connections", lambda v: v >= 3)
    with httpx.Client(base_url=server.url) as open_connection:
        assert open_connection.get("/readyz").status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5
        while open_connection.get("/readyz").status_code != 503:  # a connection opened before the signal
            assert time.monotonic() < end
            time.sleep(0.02)
        # a later request on a kept-alive connection opened before the signal: 503, the client retries elsewhere
        refused = open_connection.post("/generate", json={"seed": 3, "steps": 5}, timeout=10)
        assert refused.status_code == 503 and "Retry-After" in refused.headers
    with pytest.raises(httpx.ConnectError):  # new connections are refused: a load balancer fails over
        httpx.get(server.url + "/readyz", timeout=2)
    for expected in (200, 503):  # its first request served; its second, on the same connection, refused
        routed.request("POST", "/generate", body=json.dumps({"seed": 4, "steps": 5}), headers={"Content-Type": "application/json"})
        answer = routed.getresponse()
        body = json.loads(answer.read())
        assert answer.status == expected, body
    assert "draining" in json.dumps(body)
    routed.close()
    t.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 2
    assert server.proc.wait(30) == 0


def test_sigterm_on_an_idle_server_still_answers_a_connection_accepted_before(model_1000: Path) -> None:
    # an idle engine used to mean an exit at once: uvicorn's shutdown closed a connection accepted before the signal
    # whose request was still on its way (nginx answered that POST 502). The first request of such a connection is
    # answered; a connection that stays silent holds the exit up to its header deadline only.
    s = ServerProcess(model_1000, DDPM_REQUEST_READ_TIMEOUT_S="3")
    try:
        s.wait_ready()
        routed = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        routed.connect()
        opened = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", s.port))
        s.wait_metric("ddpm_http_connections", lambda v: v >= 3)  # both accepted by the server (and this scrape)
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        end = signalled + 5
        while True:  # until the listener has closed
            try:
                httpx.get(s.url + "/healthz", timeout=2)
            except httpx.ConnectError:
                break
            assert time.monotonic() < end
            time.sleep(0.02)
        routed.request("POST", "/generate", body=json.dumps({"seed": 4, "steps": 5}), headers={"Content-Type": "application/json"})
        answer = routed.getresponse()
        assert answer.status == 200 and len(json.loads(answer.read())["images"]) == 1
        routed.close()
        assert s.proc.wait(15) == 0
        assert time.monotonic() - opened > 3 - 0.1  # it waited for the silent connection's header deadline
        assert time.monotonic() - signalled < 3 + 8  # and not for the drain's 600 s
        silent.settimeout(5)
        assert silent.recv(4096).startswith(b"HTTP/1.1 408")
        silent.close()
    finally:
        s.stop()


def test_serve_refuses_a_missing_model(tmp_path: Path) -> None:
    """Refused before the server's own imports (torch among them): ~0.5 s, not ~3.5 s."""
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "serve", "--model", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "model directory not found" in proc.stderr, proc.stderr


def test_an_invalid_setting_is_named_as_the_operator_typed_it(tmp_path: Path) -> None:
    """pydantic named the field ("max_batch"), and DDPM_LOG_LEVEL, used by this project's own benchmarks, was no
    setting: an unknown level was a ValueError traceback from logging."""
    serve = [sys.executable, "-c", WITHOUT_TORCH, "serve", "--model", str(tmp_path / "nope")]  # refused before torch's import
    for env, said in (({"DDPM_MAX_BATCH": "0", "DDPM_PRECISION": "fp8"}, "ddpm serve: DDPM_MAX_BATCH / --max-batch: Input should be "
                       "greater than or equal to 1 (got '0')\nddpm serve: DDPM_PRECISION / --precision: Input should be 'auto', "
                       "'fp32', 'bf16' or 'fp16' (got 'fp8')"),
                      ({"DDPM_LOG_LEVEL": "loud"}, "ddpm serve: DDPM_LOG_LEVEL / --log-level: 'loud' is not one of critical, error, "
                       "warning, info, debug")):  # fmt: skip
        proc = subprocess.run(serve, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert proc.returncode == 1 and proc.stderr.strip() == said, proc.stderr


def test_a_ddpm_variable_that_is_no_setting_is_warned_about_and_the_log_level_is_one(model_1000: Path) -> None:
    """A typo ran the server on the default the operator believed they had changed, without a word. Kubernetes'
    service links (a Service named ddpm-serve: DDPM_SERVE_PORT=tcp://...) are not typos."""
    s = ServerProcess(model_1000, DDPM_MAX_BACH="4", DDPM_SERVE_PORT="tcp://10.0.0.7:80", DDPM_SERVE_SERVICE_HOST="10.0.0.7",
                      DDPM_LOG_LEVEL="warning", DDPM_COMPILE="off")  # fmt: skip
    try:
        s.wait_ready()
        logged = [json.loads(line) for line in s.output().splitlines() if line.startswith("{")]
        warned = [entry["msg"] for entry in logged if entry["logger"] == "ddpm.settings"]  # this shell's own DDPM_* too
        assert "DDPM_MAX_BACH is not a setting and is ignored: did you mean DDPM_MAX_BATCH?" in warned
        assert not [w for w in warned if w.startswith("DDPM_SERVE_")]
        assert logged and all(entry["level"] != "info" for entry in logged)  # DDPM_LOG_LEVEL=warning: uvicorn's start lines gone
    finally:
        s.stop()


@pytest.mark.skipif(not cpu_compiler_available(), reason="the background compile needs a C++ compiler")
def test_a_sigterm_during_the_background_compile_exits_0_not_aborting(model_1000: Path, tmp_path: Path) -> None:
    """Once ready, the compile thread builds the graphs behind the eager path; a SIGTERM 8-15 s after the start (a
    rolling update of a new pod) found it inside inductor, and the interpreter's exit under it aborted: exit 134 in 4 of
    4 tries by hand (a cold inductor cache, the signal 8-12 s in), and here in 4 of 4 (the signal once inductor has
    written a kernel's source: it builds it now). The drain closes the switch; a thread that has not reached its next
    check within COMPILE_STOP_S is left behind by an exit at once."""
    s = ServerProcess(model_1000, DDPM_COMPILE="auto", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # cold: a long compile
    try:
        s.wait_ready()
        cache, end = tmp_path / "inductor", time.monotonic() + 60
        while not any(p.suffix == ".cpp" for p in cache.rglob("*")):  # inductor has generated a kernel and builds it now
            assert time.monotonic() < end and s.proc.poll() is None, "the compile never started"
            time.sleep(0.05)
        assert "compiling" in httpx.get(s.url + "/info", timeout=5).json()["hot_path"].values()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(60)
        log = s.output()
        assert code == 0 and "terminate called" not in log, log[-3000:]
    finally:
        s.stop()


def test_forwarded_for_is_ignored_unless_trusted(model_1000: Path) -> None:
    # uvicorn rewrites the client from X-Forwarded-For for loopback peers unless told not to: a local
    # sidecar could then pick its own quota key. The project's policy (DDPM_TRUST_FORWARDED_FOR) rules.
    s = ServerProcess(model_1000, DDPM_MAX_IMAGES_PER_CLIENT="1")
    try:
        s.wait_ready()
        held: dict[str, int] = {}

        def hold() -> None:
            r = httpx.post(s.url + "/generate", json={"seed": 1, "steps": 1000}, headers={"X-Forwarded-For": "1.1.1.1"}, timeout=60)
            held["code"] = r.status_code

        t = threading.Thread(target=hold)
        t.start()
        s.wait_metric("ddpm_running_samples", lambda v: v == 1)
        spoofed = httpx.post(s.url + "/generate", json={"seed": 2, "steps": 5}, headers={"X-Forwarded-For": "2.2.2.2"}, timeout=30)
        assert spoofed.status_code == 429  # both count against 127.0.0.1
        t.join(60)
        assert held["code"] == 200
        logged = [json.loads(line) for line in s.output().splitlines() if '"ddpm.access"' in line]
        assert logged and all(entry["client"] == "127.0.0.1" for entry in logged)
    finally:
        s.stop()


def _eight_rows_running(s: ServerProcess) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    """A 1000-step request of 8 images sent on a thread (its answer lands in the dict's "r"), once it runs."""
    s.wait_ready()
    result: dict[str, httpx.Response] = {}
    body = {"seed": 2, "batch_size": 8, "steps": 1000}
    t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(s.url + "/generate", json=body, timeout=60)))
    t.start()
    s.wait_metric("ddpm_running_samples", lambda v: v == 8)
    return t, result


def test_drain_deadline_answers_what_is_left_and_exits_0(model_1000: Path) -> None:
    s = ServerProcess(model_1000, DDPM_DRAIN_TIMEOUT_S="0.5", DDPM_RETRY_AFTER_S="3")
    try:
        t, result = _eight_rows_running(s)
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        t.join(30)
        r = result["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and "drain deadline" in r.json()["detail"]
        assert s.proc.wait(15) == 0
        assert time.monotonic() - signalled < 0.5 + 8  # the deadline plus the socket close grace, not the chain
    finally:
        s.stop()


def test_a_second_signal_answers_in_flight_requests_503_and_exits_at_once(model_1000: Path) -> None:
    """Ctrl-C twice (or a second SIGTERM) during a drain: uvicorn's forced exit answered the request in flight 500, logged
    the lifespan's cancellation as an error and then aborted the process (exit 134, the engine thread inside a U-Net call
    as the interpreter finalized). Now the request gets a 503 a client can retry elsewhere and the process exits 143."""
    s = ServerProcess(model_1000, DDPM_RETRY_AFTER_S="2")
    try:
        t, result = _eight_rows_running(s)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(15) == 128 + signal.SIGTERM, s.output()[-3000:]
        assert time.monotonic() - signalled < 3  # at once: not the 600 s drain, not the chain
        t.join(10)
        r = result["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and "second signal" in r.json()["detail"]
        out = s.output()
        assert "1 request(s) in flight answered 503" in out
        assert "terminate called" not in out and "Traceback" not in out
    finally:
        s.stop()


def test_a_server_whose_terminal_hangs_up_drains_and_exits_0(model_1000: Path) -> None:
    """``ddpm serve`` in a terminal that hangs up (SIGHUP: an SSH connection dropped): the signal's default killed it, the
    request in flight with it (its client: the connection reset; exit -1, measured). Now it drains as on SIGTERM, its
    output sent to /dev/null first (a write to the hung-up terminal fails)."""
    import pty

    master, terminal = pty.openpty()
    s = ServerProcess(model_1000, terminal=terminal)
    os.close(terminal)

    gone = threading.Event()

    def read_the_terminal() -> None:  # as a terminal does, until it hangs up
        while not gone.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=read_the_terminal, daemon=True)
    reader.start()
    try:
        t, result = _eight_rows_running(s)
        s.proc.send_signal(signal.SIGHUP)
        gone.set()
        reader.join(5)
        os.close(master)  # the terminal is gone: a write to it fails from here on
        t.join(60)
        assert result["r"].status_code == 200
        assert s.proc.wait(15) == 0
    finally:
        s.stop()


def test_a_server_started_under_nohup_keeps_serving_through_a_hangup(model_1000: Path) -> None:
    """``nohup ddpm serve &`` asks for SIGHUP to be ignored; the server's own SIGHUP drain (above) overrode that, and
    it drained and exited 0 when the terminal closed (measured). A signal ignored from the start stays ignored."""
    s = ServerProcess(model_1000, prefix=["nohup"])
    try:
        s.wait_ready()
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert s.proc.poll() is None and httpx.get(s.url + "/readyz", timeout=5).status_code == 200
        s.proc.send_signal(signal.SIGTERM)  # still stops as asked
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def inheriting(setup: str) -> list[str]:
    """A ServerProcess prefix that runs ``setup`` (Python, ``signal`` imported) and then execs the server: what a process
    inherits across exec (an ignored signal, a blocked one)."""
    return [sys.executable, "-c", f"import os, signal, sys\n{setup}\nos.execv(sys.argv[1], sys.argv[1:])"]


def test_a_server_started_with_sigint_ignored_keeps_serving_through_a_ctrl_c(model_1000: Path) -> None:
    """A shell script's ``ddpm serve &`` starts with SIGINT ignored (bash does that to a background command when job
    control is off), so that the Ctrl-C meant for the script's foreground command, which the terminal sends to the
    whole process group, does not reach it. uvicorn's handler replaced the ignore and the server drained and exited 0
    on it (measured). Ignored from the start, it stays ignored, as Python leaves it; SIGTERM still stops the server."""
    script = 'python3 -c "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)" & wait'
    assert subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout.strip() == "True"  # the premise
    s = ServerProcess(model_1000, prefix=inheriting("signal.signal(signal.SIGINT, signal.SIG_IGN)"))
    try:
        s.wait_ready()
        s.proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert s.proc.poll() is None and httpx.get(s.url + "/readyz", timeout=5).status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_a_server_started_with_sigterm_blocked_still_drains_on_it(model_1000: Path) -> None:
    """The signal mask is inherited across exec: started by a parent that blocked SIGTERM, ``ddpm serve`` ignored it
    (still serving 5 s after it, measured), so ``docker stop`` would end in SIGKILL. The stop signals are unblocked at
    start."""
    s = ServerProcess(model_1000, prefix=inheriting("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})"))
    try:
        s.wait_ready()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_an_idle_kept_alive_connection_lasts_the_keep_alive_not_the_header_deadline(model_1000: Path) -> None:
    """DDPM_KEEP_ALIVE_S (uvicorn's timeout_keep_alive, 5 s unless set): behind a balancer that keeps connections to the
    replicas (an ALB: 60 s idle), the replica must close an idle one later than the balancer does, else a request sent
    on a connection the replica is closing fails. The header deadline (here 0.5 s) is a new request's, not the idle
    connection's."""
    s = ServerProcess(model_1000, DDPM_KEEP_ALIVE_S="2", DDPM_REQUEST_READ_TIMEOUT_S="0.5")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    try:
        s.wait_ready()
        for pause in (0.0, 1.2):  # the second after idling past the header deadline, within the keep-alive
            time.sleep(pause)
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"ok"}'
        start = time.monotonic()
        assert conn.sock is not None and conn.sock.recv(1) == b""  # one connection for both; closed once idle 2 s
        assert 1.5 < time.monotonic() - start < 3.5
    finally:
        conn.close()
        s.stop()


def test_the_docs_behind_a_proxys_prefix_fetch_the_schema_through_it(model_1000: Path, tmp_path: Path) -> None:
    """Behind ``location /ddpm/ { proxy_pass http://replica/; }`` the interactive docs (/ddpm/docs) fetched /openapi.json
    from the proxy's root: a 404 there, an empty page. ``DDPM_ROOT_PATH=/ddpm`` names the prefix (uvicorn's root path):
    the docs fetch /ddpm/openapi.json, whose servers name it; every route still answers at the replica's own paths."""
    from tests.nginx_process import under_a_prefix

    s = ServerProcess(model_1000, DDPM_ROOT_PATH="/ddpm/")
    proxy = None
    try:
        s.wait_ready()
        proxy, prefix = under_a_prefix(s.url, tmp_path)
        docs = httpx.get(prefix + "/docs", timeout=10)
        assert docs.status_code == 200 and "'/ddpm/openapi.json'" in docs.text, docs.text[-600:]
        schema = httpx.get(prefix + "/openapi.json", timeout=10)
        assert schema.status_code == 200 and schema.json()["servers"] == [{"url": "/ddpm"}]
        assert httpx.post(prefix + "/generate", json={"seed": 1, "steps": 2}, timeout=30).status_code == 200
        assert httpx.get(s.url + "/info", timeout=10).status_code == 200  # direct, unprefixed
    finally:
        if proxy is not None:
            proxy.stop()
        s.stop()
    refused = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "serve", "--model", str(model_1000), "--root-path", "ddpm"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "is not a path prefix: give one like /ddpm" in refused.stderr, refused.stderr


def test_a_dead_engine_exits_non_zero(model_1000: Path) -> None:
    s = ServerProcess(model_1000, DDPM_FAULT_RATE="1", DDPM_FAULT_STAGES="loop")
    try:
        s.wait_ready()  # faults are armed after warm-up; the loop dies on its first turn with work
        r = httpx.post(s.url + "/generate", json={"seed": 1, "steps": 5}, timeout=30)
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert s.proc.wait(15) == 1
        assert "engine stopped: InjectedFault" in s.output()
    finally:
        s.stop()


def test_a_stalled_engine_answers_in_flight_requests_and_exits_1(model_1000: Path) -> None:
    # the first U-Net call after ready blocks for 60 s (a hung device call): past DDPM_STALL_TIMEOUT_S the
    # request in flight gets a JSON 503, /healthz turns 503, and the process exits 1 (not SIGABRT's 134)
    s = ServerProcess(model_1000, DDPM_STALL_TIMEOUT_S="2", DDPM_FAULT_STALL_S="60", DDPM_RETRY_AFTER_S="4")
    try:
        s.wait_ready()
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(s.url + "/generate", json={"seed": 1}, timeout=60)))
        sent = time.monotonic()
        t.start()
        health = []
        while s.proc.poll() is None and time.monotonic() - sent < 30:
            try:
                health.append((time.monotonic() - sent, httpx.get(s.url + "/healthz", timeout=2).status_code))
            except httpx.HTTPError:
                break  # the listener has closed: the process is on its way out
            time.sleep(0.1)
        assert s.proc.wait(30) == 1, s.output()[-3000:]
        t.join(10)
        r = result["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "4" and "stalled" in r.json()["detail"]
        assert all(code == 200 for at, code in health if at < 1.5)  # the stall bound is 2 s
        assert [code for at, code in health if at > 2.5] in ([], [503] * len([1 for at, _ in health if at > 2.5]))
        assert time.monotonic() - sent < 2 + 10  # the bound, a watchdog period and the graceful close
        assert "engine stalled" in s.output() and "terminate called" not in s.output()
    finally:
        s.stop()


def test_a_model_that_fails_to_load_exits_non_zero(model_1000: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_1000.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    proc = subprocess.run(
        [sys.executable, "-m", "commands.main", "serve", "--port", "0", "--model", str(broken)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ddpm serve: model failed to load" in proc.stderr


def test_a_dropped_stream_is_logged_as_499(server: ServerProcess) -> None:
    body = json.dumps({"seed": 1, "batch_size": 2, "steps": 1000}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /generate/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: dropped-1\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    server.wait_metric("ddpm_running_samples", lambda v: v == 2)
    sock.close()
    server.wait_metric('ddpm_requests_total{code="499"}', lambda v: v == 1)
    end = time.monotonic() + 5
    while '"dropped-1"' not in server.output():
        assert time.monotonic() < end
        time.sleep(0.05)
    line = next(json.loads(x) for x in server.output().splitlines() if '"dropped-1"' in x and '"ddpm.access"' in x)
    assert (line["status"], line["http_status"], line["outcome"]) == (499, 200, "cancelled")


def test_a_port_in_use_exits_1_saying_so_not_aborting(model_1000: Path) -> None:
    """`make serve` twice: uvicorn cannot bind and exits while the model still loads on its thread; a normal interpreter
    exit under that thread aborted the process (exit 134, "terminate called without an active exception")."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "commands.main", "serve", "--port", str(port), "--model", str(model_1000)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "address already in use" in proc.stderr and f"ddpm serve: could not listen on 127.0.0.1:{port}" in proc.stderr
    assert "terminate called" not in proc.stderr


def test_a_sigterm_while_the_model_loads_exits_0_not_aborting() -> None:
    """An orchestrator stopping a replica that is still starting (a cancelled rollout): uvicorn shut down while the
    loader thread was inside the warm-up, and the interpreter's exit under it aborted (exit 134). The shipped model
    with compile off and max batch 512: its eager warm-up at 512 rows runs for seconds after uvicorn has started."""
    from ddpm.shipped_models import DEFAULT_MODEL

    env = {**os.environ, "DDPM_COMPILE": "off", "DDPM_MAX_BATCH": "512", "DDPM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "commands.main", "serve", "--port", "0", "--model", str(DEFAULT_MODEL)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Application startup complete" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0 and "ddpm serve: stopped before the model was ready" in out, out[-3000:]
    assert "terminate called" not in out and '"model mnist-28 ready' not in out


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="this machine has no IPv6 dual stack")
def test_host_any_ipv6_answers_both_families_and_still_drains(model_1000: Path) -> None:
    """``--host ::`` (the image's and the Deployment's, for IPv6-only clusters) answered IPv6 only: asyncio sets
    IPV6_V6ONLY, and http://127.0.0.1 was refused. One dual-stack socket now; an IPv4 client is logged as itself (not
    ``::ffff:127.0.0.1``), and SIGTERM still closes the listener and drains."""
    s = ServerProcess(model_1000, args=["--host", "::"])
    try:
        s.wait_ready()  # over IPv4
        assert httpx.get(f"http://[::1]:{s.port}/info", timeout=5).status_code == 200
        assert httpx.post(s.url + "/generate", json={"seed": 1, "steps": 2}, timeout=30).status_code == 200
        def clients(out: str) -> set[str]:
            return {json.loads(line)["client"] for line in out.splitlines() if '"ddpm.access"' in line}

        # the access line is written after the answer is sent: read at once, the POST's was not there yet (once, loaded)
        assert clients(s.wait_output(lambda out: len(clients(out)) == 2)) == {"127.0.0.1", "::1"}
        assert "listening on [::]:" in s.output()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        for url in (s.url, f"http://[::1]:{s.port}"):
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/healthz", timeout=2)
    finally:
        s.stop()


def test_the_listening_socket_for_other_hosts_and_a_kernel_without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.api.request_log import client_key
    from service.listening_socket import listening_socket

    assert listening_socket("127.0.0.1", 1) == (None, "127.0.0.1") and listening_socket("0.0.0.0", 1) == (None, "0.0.0.0")
    monkeypatch.setattr(socket, "has_dualstack_ipv6", lambda: False)
    assert listening_socket("::", 1) == (None, "0.0.0.0")
    for peer, key in [("::ffff:10.1.2.3", "10.1.2.3"), ("::1", "::1"), ("2001:db8::7", "2001:db8::7"), ("10.0.0.1", "10.0.0.1"),
                      ("::ffff:zz", "::ffff:zz")]:  # fmt: skip
        assert client_key({"client": (peer, 5)}, trust_forwarded_for=False) == key
