"""A burst of identical requests: served by one shared job (service/api/in_flight.py) against each making its own
images (the server with the response cache off: every server did that before, as do diffusers behind FastAPI,
LitServe and Ray Serve).

    python benchmarks/identical_requests.py                       # 10 clients, 5 bursts, the default chain
    python benchmarks/identical_requests.py --clients 10 --body '{"batch_size": 4, "steps": 50, "sampler": "ddim"}'
    python benchmarks/identical_requests.py --parts --clients 16 --body '{"batch_size": 16, "steps": 50, "sampler": "ddim"}'
    python benchmarks/identical_requests.py --urgent --body '{"batch_size": 16, "steps": 50, "sampler": "ddim"}'

``--parts``: a burst is one request and, ``--parts-after`` seconds later (once its job runs), ``--clients`` requests
for one image of it each (``first_image`` k: a gallery fetching each image of a batch it asked for), which share the
running job (service/api/in_flight.py), or make their own images with the cache off.

``--urgent``: a burst is the request at priority 5 (a bulk job), another request of other images at priority 3 half
``--urgent-after`` later (a job that outranks it), and the first request again at priority 0 ``--urgent-after`` seconds
in (a person waiting for the same images). "shared": the urgent one shares the bulk job and raises it to priority 0
(``Engine.promote``); "own jobs": it makes its own images (as it did before priority inheritance, cache or not).
The "median answer" column is then the urgent request's answer.

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


async def burst(url: str, body: dict, clients: int, parts_after: float | None = None,
                urgent_after: float | None = None) -> tuple[float, float, set[str]]:  # fmt: skip
    """The burst's time, its median answer time, and the X-Cache values seen (``parts_after``: the whole request, then
    that many seconds later ``clients`` one-image parts of it; ``urgent_after``: the --urgent burst, whose second
    figure is the urgent request's answer time)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.monotonic()

        async def one(asked: dict, after: float = 0.0) -> tuple[float, str]:
            await asyncio.sleep(after)
            r = await http.post("/generate", json=asked)
            r.raise_for_status()
            return time.monotonic() - start, r.headers["x-cache"]

        if urgent_after is not None:
            bulk, rival = {**body, "priority": 5}, {**body, "seed": body["seed"] + 500_000, "priority": 3}
            answers = await asyncio.gather(one(bulk), one(rival, urgent_after / 2), one({**body, "priority": 0}, urgent_after))
            return max(t for t, _ in answers), answers[2][0] - urgent_after, {c for _, c in answers}  # from its own sending
        if parts_after is None:
            answers = await asyncio.gather(*(one(body) for _ in range(clients)))
        else:
            n = body.get("batch_size", 1)
            parts = [one({**body, "batch_size": 1, "first_image": k % n}, parts_after) for k in range(clients)]
            answers = await asyncio.gather(one(body), *parts)
    times = [t for t, _ in answers]
    return max(times), statistics.median(times), {c for _, c in answers}


def measure(model: Path, cache_mb: str, body: dict, clients: int, bursts: int, parts_after: float | None,
            urgent_after: float | None = None) -> dict[str, float]:  # fmt: skip
    server = ServerProcess(model, DDPM_COMPILE="off", DDPM_THREADS="1", DDPM_RESPONSE_CACHE_MB=cache_mb, DDPM_LOG_LEVEL="warning")
    try:
        server.wait_ready(300)
        asyncio.run(burst(server.url, {**body, "seed": 999_999}, 1))  # warm: the first call of each size is slow
        walls, medians, rows, seen = [], [], [], set()
        for b in range(bursts):
            before = rows_run(server.url)
            wall, median, cache = asyncio.run(burst(server.url, {**body, "seed": 1000 + b}, clients, parts_after, urgent_after))
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
    p.add_argument("--urgent", action="store_true", help="a priority-5 request, a priority-3 rival, then the first at priority 0")
    p.add_argument("--urgent-after", type=float, default=1.0, help="seconds from the bulk request to the urgent one")
    args = p.parse_args()
    parts_after = args.parts_after if args.parts else None
    urgent_after = args.urgent_after if args.urgent else None
    results = {}
    for mode, cache_mb in MODES.items():
        what = f"1 x {json.dumps(args.body)}, then {args.clients} one-image parts of it" if args.parts else \
            f"{json.dumps(args.body)} at priority 5, a rival at 3, then the first at 0" if args.urgent else \
            f"{args.clients} x {json.dumps(args.body)} at once"  # fmt: skip
        print(f"{mode}: {what}, {args.bursts} bursts", flush=True)
        results[mode] = r = measure(args.model, cache_mb, args.body, args.clients, args.bursts, parts_after, urgent_after)
        answer = "the urgent answer" if args.urgent else "median answer"
        print(f"  burst {r['wall']:.3f} s, {answer} {r['median']:.3f} s, {r['rows']:.0f} U-Net rows per burst", flush=True)
    own, shared = results["own jobs"], results["shared"]
    print(f"own jobs / shared: burst time {own['wall'] / shared['wall']:.2f}x, median answer {own['median'] / shared['median']:.2f}x, "
          f"U-Net rows {own['rows'] / shared['rows']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
