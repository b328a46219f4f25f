"""A `ddpm serve` child process on a free loopback port, for tests that need a real server."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.prometheus_text import sample_value


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (default: this one), from /proc."""
    fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path | str, prefix: list[str] | None = None, args: list[str] | None = None, terminal: int | None = None,
                 **env: str) -> None:  # fmt: skip
        """``terminal``: a pty's end for the server's standard streams (its output then goes there, not to ``output()``)."""
        self.port = free_port()
        # over TLS (DDPM_TLS_CERT_FILE, self-signed as tests/tls_pairs.py makes them): https, trusting that certificate
        cert = env.get("DDPM_TLS_CERT_FILE")
        self.url = f"{'https' if cert else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cert) if cert else True
        full_env = {**os.environ, "DDPM_WARMUP_STEPS": "1", "DDPM_MAX_BATCH": "8", "DDPM_THREADS": "1", **env}
        cmd = [sys.executable, "-m", "commands.main", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--model", str(model)]
        cmd = [*(prefix or []), *cmd, *(args or [])]  # prefix: e.g. a sandbox the server runs inside; args: more flags
        # a file, not a pipe: nobody reads a pipe while the test runs, and a full one would block the server's logging
        self.log = tempfile.NamedTemporaryFile("w+", encoding="utf-8", prefix="ddpm-serve-", suffix=".log")
        if terminal is not None:
            self.proc = subprocess.Popen(cmd, env=full_env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
        else:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/readyz", timeout=1, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def metric(self, name: str) -> float:
        return sample_value(httpx.get(self.url + "/metrics", timeout=5, verify=self.verify).text, name)

    def wait_metric(self, name: str, predicate, timeout: float = 20.0) -> float:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.metric(name)
            if predicate(value):
                return value
            time.sleep(0.02)
        raise AssertionError(f"{name} stayed at {self.metric(name)}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(encoding="utf-8")

    def wait_output(self, done, timeout: float = 10.0) -> str:  # type: ignore[no-untyped-def]
        """The output once ``done(output)`` holds (a line the server writes after its answer: the access log's); the
        test fails with the output when it does not within ``timeout``."""
        end = time.monotonic() + timeout
        while not done(out := self.output()):
            assert time.monotonic() < end, out[-2000:]
            time.sleep(0.02)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()
