"""What a span per request costs (DDPM_OTLP_TRACES_ENDPOINT): two replicas of the shipped model side by side, one
sending its spans over OTLP/HTTP to a collector in this process (which only counts them), one without, asked the same
requests in alternating rounds. Printed: the median latency of each kind of request on each, and their ratio.

    .venv/bin/python benchmarks/tracing_overhead.py --rounds 5 --per-round 40

Kinds: ``cached`` (an identical /generate answered from the response cache: the least work a generation request is,
where a span's cost shows most), ``schedule`` (GET /schedule), ``fresh`` (a new 1-image 10-call /generate).
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402


class _Sink(http.server.BaseHTTPRequestHandler):
    batches = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _Sink.batches += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _timed(client: httpx.Client, kind: str, seed: int) -> float:
    start = time.perf_counter()
    if kind == "schedule":
        answer = client.get("/schedule")
    else:
        answer = client.post("/generate", json={"seed": 7 if kind == "cached" else seed, "steps": 10})
    assert answer.status_code == 200, answer.text
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=40)
    args = parser.parse_args()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    env = {"DDPM_COMPILE": "off", "DDPM_THREADS": "1"}
    servers = {"off": ServerProcess(ROOT / "models" / "mnist-28", **env),
               "on": ServerProcess(ROOT / "models" / "mnist-28", DDPM_OTLP_TRACES_ENDPOINT=endpoint, **env)}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for s in servers.values():
            s.wait_ready(120)
        clients = {name: httpx.Client(base_url=s.url, timeout=60) for name, s in servers.items()}
        seed = 1000
        for _ in range(args.rounds):
            for kind in ("cached", "schedule", "fresh"):
                for name in ("off", "on") if seed % 2 else ("on", "off"):  # which goes first alternates
                    for i in range(args.per_round):
                        times.setdefault((kind, name), []).append(_timed(clients[name], kind, seed + i))
                seed += args.per_round
    finally:
        for s in servers.values():
            s.stop()
    print(f"{args.rounds} rounds x {args.per_round} requests each; spans exported in {_Sink.batches} batches")
    for kind in ("cached", "schedule", "fresh"):
        off, on = (statistics.median(times[(kind, name)]) * 1e3 for name in ("off", "on"))
        print(f"{kind:9s} median off {off:7.2f} ms  on {on:7.2f} ms  on/off {on / off:.3f}")


if __name__ == "__main__":
    main()
