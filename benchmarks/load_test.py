"""Bounded load against a real `ddpm serve` on loopback: burst (overload) and soak modes.

    python benchmarks/load_test.py burst --requests 300 --max-queue 32      # fast 503s, nothing lost, bounded memory
    python benchmarks/load_test.py soak --seconds 120 --concurrency 8        # steady mixed load: flat memory and latency

Starts its own server on a tiny random U-Net (or --model DIR) on 127.0.0.1, sends a fixed number of
requests (burst) or runs for a fixed time (soak), then stops. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model


def rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one(client: httpx.AsyncClient, seed: int, steps: int, n: int = 1) -> tuple[int, float]:
    start = time.monotonic()
    try:
        r = await client.post("/generate", json={"seed": seed, "batch_size": n, "steps": steps})
        return r.status_code, time.monotonic() - start
    except httpx.HTTPError:
        return -1, time.monotonic() - start


async def burst(server: ServerProcess, args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.requests)
    async with httpx.AsyncClient(base_url=server.url, timeout=args.timeout, limits=limits) as client:
        results = await asyncio.gather(*(one(client, i, args.steps) for i in range(args.requests)))
    codes = [c for c, _ in results]
    rejected = [t for c, t in results if c == 503]
    served = [t for c, t in results if c == 200]
    _, peak = rss_kb(server.proc.pid)
    return {
        "mode": "burst",
        "requests": args.requests,
        "max_queue": args.max_queue,
        "max_batch": args.max_batch,
        "served_200": len(served),
        "rejected_503": len(rejected),
        "other": sorted({c for c in codes if c not in (200, 503)}),
        "reject_latency_p50_s": round(percentile(rejected, 0.5), 4),
        "reject_latency_p99_s": round(percentile(rejected, 0.99), 4),
        "served_latency_p50_s": round(percentile(served, 0.5), 3),
        "server_images_generated_total": server.metric("ddpm_images_generated_total"),
        "server_requests_200": server.metric('ddpm_requests_total{code="200"}'),
        "server_requests_503": server.metric('ddpm_requests_total{code="503"}'),
        "server_peak_rss_mib": round(peak / 1024, 1),
    }


async def soak(server: ServerProcess, args: argparse.Namespace) -> dict[str, object]:
    end = time.monotonic() + args.seconds
    window = args.seconds / 4
    start = time.monotonic()
    latencies: list[list[float]] = [[] for _ in range(4)]
    rss: list[list[int]] = [[] for _ in range(4)]
    counts = {"sent": 0, "ok": 0, "other": 0}

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        i = 0
        while time.monotonic() < end:
            steps = [10, 50, 200][(w + i) % 3]
            code, dt = await one(client, 1000 * w + i, steps)
            counts["sent"] += 1
            counts["ok" if code == 200 else "other"] += 1
            if code == 200:
                latencies[min(3, int((time.monotonic() - start) / window))].append(dt / steps)
            i += 1

    async def sampler() -> None:
        while time.monotonic() < end:
            rss[min(3, int((time.monotonic() - start) / window))].append(rss_kb(server.proc.pid)[0])
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=server.url, timeout=args.timeout) as client:
        await asyncio.gather(sampler(), *(worker(w, client) for w in range(args.concurrency)))
    return {
        "mode": "soak",
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "client_sent": counts["sent"],
        "client_ok": counts["ok"],
        "client_other": counts["other"],
        "server_requests_200": server.metric('ddpm_requests_total{code="200"}'),
        "server_images_generated_total": server.metric("ddpm_images_generated_total"),
        "latency_per_step_ms_p50_by_quarter": [round(1e3 * statistics.median(q), 3) if q else None for q in latencies],
        "rss_mib_median_by_quarter": [round(statistics.median(q) / 1024, 1) if q else None for q in rss],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["burst", "soak"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else save_tiny_model(Path(tmp) / "tiny")
        env = {"DDPM_MAX_QUEUE": str(args.max_queue), "DDPM_MAX_BATCH": str(args.max_batch), "DDPM_MAX_IMAGES_PER_CLIENT": "100000",
               "DDPM_LOG_FORMAT": "json"}  # fmt: skip
        server = ServerProcess(model, **env)
        try:
            server.wait_ready()
            report = asyncio.run(burst(server, args) if args.mode == "burst" else soak(server, args))
        finally:
            server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
