"""Hostile round three, measured: the figures behind RELIABILITY.md's connection, ETag and client rows.

    python benchmarks/hostile_probes.py connections --seconds 25   # idle sockets / in-flight requests vs the probes
    python benchmarks/hostile_probes.py etag                       # which replicas share ETags, and which must not
    python benchmarks/hostile_probes.py client                     # the client against a misbehaving server

connections: a real ``ddpm serve`` (tiny random U-Net) with DDPM_MAX_CONNECTIONS=32. An attacker
holds 32 idle TCP connections open (no request sent), reopening each as the server closes it; a
prober opens a fresh connection every 0.5 s, as a kubelet does, for /healthz, /readyz and /metrics,
and asks /generate too. Then 31 legitimate in-flight requests instead of the idle sockets.
etag: in-process apps on copies of one model: byte-identical copies, a reformatted config, and
configs that change the maths (beta_end, variance type); a code version bump.
client: service.client against the socket server of tests/test_client_misbehaving_server.py:
seconds to the error and the client's peak RSS, one fresh process per case.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_process import ServerProcess
from tests.tiny_model import copy_model_with, save_tiny_model


class IdleAttacker:
    """Holds ``n`` connections that never send a byte, reopening each as soon as it is closed."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n, self.stop, self.opened = port, n, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        self.opened += 1
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setblocking(False)
        return s

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.n)]
        while not self.stop.is_set():
            for i, s in enumerate(socks):
                try:
                    s.recv(4096)  # the 408, or EOF: the server dropped it
                    s.close()
                    socks[i] = self._open()
                except BlockingIOError:
                    pass  # still open and silent
                except OSError:
                    socks[i] = self._open()
            time.sleep(0.05)
        for s in socks:
            s.close()


def _probe_round(url: str) -> dict[str, tuple[int, float]]:
    out = {}
    for path in ("/healthz", "/readyz", "/metrics"):
        start = time.monotonic()
        try:
            code = httpx.get(url + path, timeout=5, headers={"Connection": "close"}).status_code
        except httpx.HTTPError:
            code = 0
        out[path] = (code, time.monotonic() - start)
    try:
        out["/generate"] = (httpx.post(url + "/generate", json={"seed": 0, "steps": 2}, timeout=30).status_code, 0.0)
    except httpx.HTTPError:
        out["/generate"] = (0, 0.0)
    return out


def _summary(rounds: list[dict[str, tuple[int, float]]]) -> dict[str, object]:
    report: dict[str, object] = {}
    for path in rounds[0]:
        codes = [r[path][0] for r in rounds]
        latencies = sorted(r[path][1] for r in rounds)
        entry: dict[str, object] = {"polls": len(codes), "codes": {str(c): codes.count(c) for c in sorted(set(codes))}}
        if path != "/generate":
            entry.update(p50_ms=round(1000 * statistics.median(latencies), 1), max_ms=round(1000 * latencies[-1], 1))
        report[path] = entry
    return report


def connections(args: argparse.Namespace) -> dict[str, object]:
    model = save_tiny_model(Path(tempfile.mkdtemp()) / "tiny", num_timesteps=1000)
    server = ServerProcess(model, DDPM_MAX_CONNECTIONS="32", DDPM_COMPILE="off", DDPM_MAX_BATCH="64")
    report: dict[str, object] = {}
    try:
        server.wait_ready(120)
        attacker = IdleAttacker(server.port, 32)
        attacker.thread.start()
        time.sleep(1.0)
        rounds, end = [], time.monotonic() + args.seconds
        while time.monotonic() < end:
            rounds.append(_probe_round(server.url))
            time.sleep(0.5)
        attacker.stop.set()
        attacker.thread.join()
        report["32 idle connections"] = {**_summary(rounds), "attacker_connections_opened": attacker.opened}
        report["idle connections closed at the deadline"] = server.metric('ddpm_http_connection_deadlines_total{reason="idle"}')

        # 31 legitimate long requests in flight instead (1000-step chains on the tiny model)
        def long_request() -> None:
            try:
                httpx.post(server.url + "/generate", json={"seed": 1, "sampler": "ddpm"}, timeout=600)
            except httpx.HTTPError:
                pass

        workers = [threading.Thread(target=long_request, daemon=True) for _ in range(31)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        rounds, end = [], time.monotonic() + min(args.seconds, 15)
        while time.monotonic() < end:
            rounds.append(_probe_round(server.url))
            time.sleep(0.5)
        report["31 requests in flight"] = _summary(rounds)
        for w in workers:
            w.join(600)
    finally:
        server.stop()
    return report


def etag(args: argparse.Namespace) -> dict[str, object]:
    from fastapi.testclient import TestClient

    import ddpm
    from service import server_state as runtime
    from service.api.app import create_app
    from service.settings import Settings

    root = Path(tempfile.mkdtemp())
    base = save_tiny_model(root / "base", num_timesteps=100)

    def variant(name: str, **changes: object) -> Path:
        return copy_model_with(base, root / name, **changes)

    replicas = {
        "original": base,
        "copy, config reformatted": variant("copy"),
        "beta_end 0.03": variant("beta", schedule__params__beta_end=0.03),
        "variance fixed_large": variant("var", variance_type="fixed_large"),
    }
    requests = [{"seed": s, "batch_size": 1, "steps": 10, "sampler": "ddpm"} for s in range(args.requests)]

    def etags_and_images(directory: Path) -> list[tuple[str, bytes]]:
        with TestClient(create_app(Settings(model=directory, compile="off", warmup_steps=1))) as c:  # type: ignore[arg-type]
            while c.get("/readyz").status_code != 200:
                time.sleep(0.02)
            out = []
            for body in requests:
                r = c.post("/generate", json=body, headers={"Accept": "image/png"})
                out.append((r.headers["etag"], r.content))
            return out

    answers = {name: etags_and_images(d) for name, d in replicas.items()}
    saved = ddpm.__version__
    runtime.__version__ = "999.0.0"  # type: ignore[attr-defined]
    try:
        answers["code version bump"] = etags_and_images(base)
    finally:
        runtime.__version__ = saved  # type: ignore[attr-defined]
    report: dict[str, object] = {"requests": len(requests)}
    reference = answers["original"]
    for name, got in answers.items():
        if name == "original":
            continue
        same_etag = sum(a[0] == b[0] for a, b in zip(got, reference, strict=True))
        same_image = sum(a[1] == b[1] for a, b in zip(got, reference, strict=True))
        wrong_304 = sum(a[0] == b[0] and a[1] != b[1] for a, b in zip(got, reference, strict=True))
        report[name] = {"same ETag as original": same_etag, "same image": same_image, "a 304 would serve a wrong image": wrong_304}
    return report


CLIENT_CASE = """
import resource, sys, time
sys.path.insert(0, {root!r})
from tests.test_client_misbehaving_server import MisbehavingServer, _stall, _trickle, _endless_stream, _huge_chunked, _answer
from service.client import Client, ClientError
cases = {{"stall": _stall, "trickle": _trickle, "endless stream": _endless_stream, "400 MB body": _huge_chunked,
         "garbage": _answer(b"<html>")}}
server = MisbehavingServer()
server.behaviour = cases[sys.argv[1]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    with Client(server.url, timeout_s={timeout}, max_retries=0) as client:
        client.generate(0, 1, on_event=(lambda *_: None) if sys.argv[1] == "endless stream" else None)
    outcome = "answered"
except ClientError as exc:
    outcome = f"{{type(exc).__name__}}: {{str(exc)[:80]}}"
print(round(time.monotonic() - start, 2), "|", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "|",
      round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024), "|", outcome)
"""


def client(args: argparse.Namespace) -> dict[str, object]:
    root = str(Path(__file__).resolve().parent.parent)
    print("| server does | seconds to the error | client peak RSS MB | grown during the call MB | what the caller gets |")
    print("|---|---|---|---|---|")
    for case in ("stall", "trickle", "endless stream", "400 MB body", "garbage"):
        code = CLIENT_CASE.format(root=root, timeout=args.timeout)
        line = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=300).stdout.strip()
        print(f"| {case} | {line} |")
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("connections")
    c.add_argument("--seconds", type=float, default=25.0)
    e = sub.add_parser("etag")
    e.add_argument("--requests", type=int, default=20)
    cl = sub.add_parser("client")
    cl.add_argument("--timeout", type=float, default=10.0, help="the client's timeout_s")
    args = p.parse_args()
    report = {"connections": connections, "etag": etag, "client": client}[args.mode](args)
    if report:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
