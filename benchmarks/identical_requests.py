"""A burst of identical requests: served by one shared job (service/api/in_flight.py) against each making its own
images (the server with the response cache off: every server did that before, as do diffusers behind FastAPI,
LitServe and Ray Serve).

    python benchmarks/identical_requests.py                       # 10 clients, 5 bursts, the default chain
    python benchmarks/identical_requests.py --clients 10 --body '{"batch_size": 4, "steps": 50, "sampler": "ddim"}'
    python benchmarks/identical_requests.py --parts --clients 16 --body '{"batch_size": 16, "steps": 50, "sampler": "ddim"}'

``--parts``: a burst is one request and, ``--parts-after`` seconds later (once its job runs), ``--clients`` requests
for one image of it each (``first_image`` k: a gallery fetching each image of a batch it asked for), which share the
running job (service/api/in_flight.py), or make their own images with the cache off.

One ``ddpm serve`` per mode (the shipped model, compile off, 1 torch thread), started one after the other. Each burst
sends ``--clients`` copies of one request at once (a new seed per burst, so no burst finds the last one's images in
the cache) and waits for every answer. Reported per mode: the median over bursts of the burst's time (its last
answer) and of the median answer within it, and the U-Net rows the server ran per burst
(``ddpm_batch_occupancy_sum``); then the ratios. The rows are exact; the times move with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.prometheus_text import sample_value  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

MODES = {"shared": "64", "own jobs": "0"}  # DDPM_RESPONSE_CACHE_MB: sharing rides on the cache


def rows_run(url: str) -> float:
    return sample_value(httpx.get(url + "/metrics", timeout=10).text, "ddpm_batch_occupancy_sum")


async def burst(url: str, body: dict, clients: int, parts_after: float | None = None) -> tuple[float, float, set[str]]:
    """The burst's time, its median answer time, and the X-Cache values seen (``parts_after``: the whole request, then
    that many seconds later ``clients`` one-image parts of it)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.monotonic()

        async def one(asked: dict, after: float = 0.0) -> tuple[float, str]:
            await asyncio.sleep(after)
            r = await http.post("/generate", json=asked)
            r.raise_for_status()
            return time.monotonic() - start, r.headers["x-cache"]

        if parts_after is None:
            answers = await asyncio.gather(*(one(body) for _ in range(clients)))
        else:
            n = body.get("batch_size", 1)
            parts = [one({**body, "batch_size": 1, "first_image": k % n}, parts_after) for k in range(clients)]
            answers = await asyncio.gather(one(body), *parts)
    times = [t for t, _ in answers]
    return max(times), statistics.median(times), {c for _, c in answers}


def measure(model: Path, cache_mb: str, body: dict, clients: int, bursts: int, parts_after: float | None) -> dict[str, float]:
    server = ServerProcess(model, DDPM_COMPILE="off", DDPM_THREADS="1", DDPM_RESPONSE_CACHE_MB=cache_mb, DDPM_LOG_LEVEL="warning")
    try:
        server.wait_ready(300)
        asyncio.run(burst(server.url, {**body, "seed": 999_999}, 1))  # warm: the first call of each size is slow
        walls, medians, rows, seen = [], [], [], set()
        for b in range(bursts):
            before = rows_run(server.url)
            wall, median, cache = asyncio.run(burst(server.url, {**body, "seed": 1000 + b}, clients, parts_after))
            rows.append(rows_run(server.url) - before)
            walls.append(wall)
            medians.append(median)
            seen |= cache
        print(f"  X-Cache seen: {sorted(seen)}", flush=True)
        return {"wall": statistics.median(walls), "median": statistics.median(medians), "rows": statistics.median(rows)}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mnist-28")
    p.add_argument("--clients", type=int, default=10, help="identical requests sent at once")
    p.add_argument("--bursts", type=int, default=5)
    p.add_argument("--body", type=json.loads, default={"batch_size": 1}, help="the request, less its seed (JSON)")
    p.add_argument("--parts", action="store_true", help="one request, then --clients one-image parts of it")
    p.add_argument("--parts-after", type=float, default=0.3, help="seconds from the whole request to its parts")
    args = p.parse_args()
    parts_after = args.parts_after if args.parts else None
    results = {}
    for mode, cache_mb in MODES.items():
        what = f"1 x {json.dumps(args.body)}, then {args.clients} one-image parts of it" if args.parts else \
            f"{args.clients} x {json.dumps(args.body)} at once"  # fmt: skip
        print(f"{mode}: {what}, {args.bursts} bursts", flush=True)
        results[mode] = r = measure(args.model, cache_mb, args.body, args.clients, args.bursts, parts_after)
        print(f"  burst {r['wall']:.3f} s, median answer {r['median']:.3f} s, {r['rows']:.0f} U-Net rows per burst", flush=True)
    own, shared = results["own jobs"], results["shared"]
    print(f"own jobs / shared: burst time {own['wall'] / shared['wall']:.2f}x, median answer {own['median'] / shared['median']:.2f}x, "
          f"U-Net rows {own['rows'] / shared['rows']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
