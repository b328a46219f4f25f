"""TLS end to end: ``ddpm serve`` on a certificate (DDPM_TLS_CERT_FILE, DDPM_TLS_KEY_FILE) refused at start where it
cannot serve, renewed while serving, its handshake held to the read deadline; the container's health probe over it;
the client's TLS failures said at once with what mends them (RELIABILITY.md, round seventeen)."""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import Client, ServerError, Unreachable
from service.health_probe import healthy
from service.tls_certificate import ServedCertificate, served_certificate
from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model
from tests.tls_pairs import tls_pair

ROOT = Path(__file__).resolve().parent.parent


def served_certificate_der(port: int) -> bytes:
    """The certificate a new connection to 127.0.0.1:``port`` is shown (DER), not checked."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def not_after(cert: Path | str) -> float:
    """The end of a certificate's validity as openssl reads it (Unix time)."""
    from tests.tls_pairs import openssl_or_skip

    end = subprocess.run([openssl_or_skip(), "x509", "-in", str(cert), "-noout", "-enddate"], capture_output=True, text=True, check=True)
    return float(ssl.cert_time_to_seconds(end.stdout.strip().removeprefix("notAfter=")))


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text(encoding="ascii"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("tls")
    return {name: tls_pair(d, name) for name in ("first", "renewed")} | {"expired": tls_pair(d, "expired", days=-1)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pairs: dict[str, tuple[Path, Path]]) -> Iterator[ServerProcess]:
    """A TLS server on files of its own (the renewal test writes over them), a 1 s read deadline."""
    d = tmp_path_factory.mktemp("served")
    cert, key = d / "tls.crt", d / "tls.key"
    shutil.copy(pairs["first"][0], cert), shutil.copy(pairs["first"][1], key)
    model = save_tiny_model(d / "tiny", num_timesteps=50)
    s = ServerProcess(model, DDPM_TLS_CERT_FILE=str(cert), DDPM_TLS_KEY_FILE=str(key), DDPM_REQUEST_READ_TIMEOUT_S="1",
                      DDPM_COMPILE="off")  # fmt: skip
    s.wait_ready()
    yield s
    s.stop()


def test_a_tls_server_answers_https_and_says_its_certificate(server: ServerProcess) -> None:
    answer = httpx.post(server.url + "/generate", json={"seed": 3, "batch_size": 2, "steps": 2}, verify=server.verify, timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 2
    assert "TLS on: certificate " in server.output() and "for first, localhost, 127.0.0.1, valid until" in server.output()
    # when it ends, for the alert that a renewal never reached the file (DdpmTlsCertificateExpiresSoon)
    served = server.output().split("TLS on: certificate ", 1)[1].split(" ")[0]  # the server's own copy of "first"
    assert server.metric("ddpm_tls_certificate_expiry_timestamp_seconds") == not_after(served)


def test_the_containers_health_probe_speaks_https_where_tls_is_set(server: ServerProcess) -> None:
    assert healthy(server.port, tls=True) == (True, f"https://127.0.0.1:{server.port}/healthz: 200")
    # TLS set by a flag, not the variable: the plain request closed unanswered, the probe asks again in https
    assert healthy(server.port, tls=False)[0]
    probe = subprocess.run([sys.executable, "-m", "service.health_probe", str(server.port)], capture_output=True, text=True,
                           env={"PATH": "", "DDPM_TLS_CERT_FILE": "/x", "HTTP_PROXY": "http://127.0.0.1:9"}, cwd=ROOT)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    closed = subprocess.run([sys.executable, "-m", "service.health_probe", "9"], capture_output=True, text=True, cwd=ROOT)
    assert closed.returncode == 1 and "http://127.0.0.1:9/healthz: [Errno 111] Connection refused" in closed.stderr


def test_a_silent_connection_is_closed_at_the_read_deadline_not_asyncios_60_s(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as silent:
        start = time.monotonic()
        assert silent.recv(100) == b""  # closed by the server, no handshake sent
        assert time.monotonic() - start < 5  # DDPM_REQUEST_READ_TIMEOUT_S=1 (60 s before)


def test_the_client_trusts_a_private_ca_through_ssl_cert_file(server: ServerProcess, pairs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    retries: list[str] = []
    with Client(server.url, on_retry=lambda why, n, s: retries.append(why)) as client, pytest.raises(Unreachable) as refused:
        client.generate(seed=1, n=1, steps=2)
    assert "TLS certificate is not trusted: self-signed certificate" in str(refused.value)
    assert "SSL_CERT_FILE=" in str(refused.value) and retries == []  # at once: retried 5 times over 15.5 s before
    with Client(server.url, verify=ssl.create_default_context(cafile=pairs["first"][0])) as client:  # the Python API's way
        assert len(client.generate(seed=1, n=1, steps=2).pngs) == 1
    monkeypatch.setenv("SSL_CERT_FILE", str(pairs["first"][0]))  # the command line's (httpx reads it)
    with Client(server.url) as client:
        assert len(client.generate(seed=1, n=1, steps=2).pngs) == 1


def test_an_http_url_on_the_tls_port_is_told_to_use_https(server: ServerProcess) -> None:
    plain = server.url.replace("https://", "http://")
    retries: list[str] = []
    with Client(plain, on_retry=lambda why, n, s: retries.append(why)) as client, pytest.raises(Unreachable) as refused:
        client.generate(seed=1, n=1, steps=2)
    assert str(refused.value) == f"{plain} speaks TLS (it closed a plain HTTP request unanswered): try {server.url}"
    assert retries == []


def test_a_renewed_certificate_is_served_to_new_connections(server: ServerProcess, pairs) -> None:  # type: ignore[no-untyped-def]
    cert = Path(server.output().split("TLS on: certificate ", 1)[1].split(" ", 1)[0])  # the server's own copies
    key = cert.with_suffix(".key")
    assert served_certificate_der(server.port) == der_of(pairs["first"][0])
    shutil.copy(pairs["renewed"][0], cert)  # caught between the two writes: the new certificate, the old key
    server.wait_output(lambda out: "the key is not the certificate's (KEY_VALUES_MISMATCH); the certificate loaded before stays" in out)
    assert served_certificate_der(server.port) == der_of(pairs["first"][0])  # still the first, whole
    shutil.copy(pairs["renewed"][1], key)
    server.wait_output(lambda out: "for renewed, localhost, 127.0.0.1" in out and "(changed: new connections get it)" in out)
    assert served_certificate_der(server.port) == der_of(pairs["renewed"][0])
    assert server.output().count("KEY_VALUES_MISMATCH") == 1  # said once, not at every look
    server.verify = ssl.create_default_context(cafile=pairs["renewed"][0])  # the clients trust the renewed one now
    assert httpx.get(server.url + "/readyz", verify=server.verify, timeout=10).status_code == 200
    assert server.metric(f'ddpm_tls_certificate_expiry_timestamp_seconds{{file="{cert}"}}') == not_after(pairs["renewed"][0])


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("cert only", "DDPM_TLS_CERT_FILE is set without DDPM_TLS_KEY_FILE: TLS needs both"),
        ("missing", "cannot read DDPM_TLS_CERT_FILE {d}/none.crt: No such file or directory"),
        ("mismatch", "DDPM_TLS_CERT_FILE {first} and DDPM_TLS_KEY_FILE {renewed_key}: the key is not the certificate's"),
        ("encrypted", "DDPM_TLS_KEY_FILE {d}/encrypted.key is encrypted with a pass phrase: give it a key without one"),
        ("not pem", "DDPM_TLS_CERT_FILE {d}/junk.crt and DDPM_TLS_KEY_FILE {first_key}: not a PEM certificate and its PEM key"),
    ],
)
def test_a_pair_that_cannot_serve_is_refused_naming_the_variable(which: str, message: str, pairs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, first_key = pairs["first"]
    args = {
        "cert only": (first, None),
        "missing": (tmp_path / "none.crt", first_key),
        "mismatch": (first, pairs["renewed"][1]),
        "encrypted": (first, tmp_path / "encrypted.key"),
        "not pem": (tmp_path / "junk.crt", first_key),
    }[which]
    (tmp_path / "junk.crt").write_text("not a certificate\n", encoding="ascii")
    if which == "encrypted":
        from tests.tls_pairs import openssl_or_skip

        subprocess.run([openssl_or_skip(), "pkey", "-in", first_key, "-aes256", "-passout", "pass:x", "-out", args[1]], check=True)
    with pytest.raises(ValueError) as refused:
        served_certificate(*args)
    expected = message.format(d=tmp_path, first=first, first_key=first_key, renewed_key=pairs["renewed"][1])
    assert expected in str(refused.value)


def test_ddpm_serve_refuses_a_mismatched_pair_before_loading_the_model(pairs) -> None:  # type: ignore[no-untyped-def]
    env = {"DDPM_TLS_CERT_FILE": str(pairs["first"][0]), "DDPM_TLS_KEY_FILE": str(pairs["renewed"][1]), "PATH": ""}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "commands.main", "serve", "--port", "9"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 1 and "ddpm serve: DDPM_TLS_CERT_FILE" in run.stderr and "KEY_VALUES_MISMATCH" in run.stderr
    assert time.monotonic() - start < 20 and "model" not in run.stderr.split("ddpm serve:")[0]


def test_an_expired_certificate_is_said_at_start_not_refused(pairs) -> None:  # type: ignore[no-untyped-def]
    expired = ServedCertificate(*pairs["expired"])
    assert "for expired, localhost, 127.0.0.1, valid until" in expired.describe()
    assert expired.describe().endswith(": EXPIRED, clients will refuse it (replace the files: they are followed while serving)")
    assert "EXPIRED" not in ServedCertificate(*pairs["first"]).describe()


def test_the_client_says_an_expired_certificate_and_a_host_it_does_not_name(pairs, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    other = tls_pair(tmp_path, "other", hosts="DNS:other.example")
    for (cert, key), expected in [
        (pairs["expired"], "'s TLS certificate is not trusted: certificate has expired; the server's certificate must be renewed"),
        (other, "'s TLS certificate is not trusted: Hostname mismatch, certificate is not valid for 'localhost'; the URL must name"),
    ]:
        with tls_http_server(cert, key) as port:
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            with Client(f"https://localhost:{port}") as client, pytest.raises(Unreachable) as refused:
                client.info()
            assert expected in str(refused.value)


def test_an_https_url_on_a_plain_port_is_told_to_use_http() -> None:
    with plain_http_server() as port, Client(f"https://127.0.0.1:{port}", max_retries=3) as client:
        with pytest.raises(Unreachable) as refused:
            client.info()
    assert str(refused.value).startswith(f"https://127.0.0.1:{port} does not speak TLS (WRONG_VERSION_NUMBER")
    assert str(refused.value).endswith("a server without a certificate speaks plain HTTP, try http://")


def test_a_proxys_html_error_page_is_said_by_its_title() -> None:
    page = ("<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n<body>\r\n<center>"
            "<h1>400 Bad Request</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n")  # fmt: skip
    transport = httpx.MockTransport(lambda request: httpx.Response(400, text=page, headers={"Content-Type": "text/html"}))
    with Client("http://lb", transport=transport) as client, pytest.raises(ServerError) as answered:
        client.generate(seed=0, n=1)
    assert str(answered.value) == "400: 400 The plain HTTP request was sent to HTTPS port"


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"version": "x"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Serving:
    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return int(self.httpd.server_address[1])

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tls_http_server(cert: Path, key: Path) -> _Serving:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return _Serving(context)


def plain_http_server() -> _Serving:
    return _Serving(None)

