"""Priorities and deadlines under overload (issue 37): an open-loop trace of interactive and bulk requests,
served once with priorities and deadlines and once as the server served before them.

    python benchmarks/scheduling.py                         # the shipped model, 60 s per cell, loads 0.8/1.2/1.5x
    python benchmarks/scheduling.py --seconds 30 --loads 1.5 --interactive-share 0.1
    python benchmarks/scheduling.py --compile auto --loads 1.5 --modes priorities   # the compiled serving path
    python benchmarks/scheduling.py --lead-in-s 0                                   # measure from an empty server
    python benchmarks/scheduling.py --loads 1.5 --recalibrate                       # the capacity again after each cell

One `ddpm serve` per mode (compile off by default; with ``--compile auto`` it is ready only once its graphs
are built, so capacity does not change during a run either; 1 torch thread, the other core for this
client). First the calibration: an interactive request's latency alone (its deadline
is 3x that), and the server's capacity in U-Net row-calls per second (closed-loop bulk requests keeping
the batch full). Then per load (offered row-calls/s as a multiple of that capacity), Poisson arrivals
(seeded; the count of each kind fixed by its rate) of
  interactive: 1 image, the default chain (restart, 10 calls), priority 0, deadline 3x its alone latency,
  bulk:        16 images, 50 calls (DDIM), priority 5, no deadline,
the interactive ones making ``--interactive-share`` of the capacity. The trace starts ``--lead-in-s`` (default: as
long as the window) before the measured window, so the window sees the backlog an overload has built, not an empty
server filling up: at 1.5x on a CPU a 60 s window holds only 6-8 bulk requests, and without a lead-in the engine ran
dry between the first few of them (7-17% of the window in stops 53-54's compiled cells). Modes:
  priorities  the fields sent; the server holds 4x max_batch rows resident (the default)
  before      no priority, no deadline, one call's rows resident (DDPM_MAX_RESIDENT = max_batch), no
              slowdown bound (DDPM_MAX_SLOWDOWN=0) and every call up to max_batch rows (DDPM_TUNE_CALL_SIZE=false):
              what every request got before issue 37
Reported per cell: of the interactive requests that arrived in the window, those answered within their deadline
(of those sent: a refusal counts as a miss), refused (503), and the worst lateness of an accepted one; and bulk
goodput: the U-Net rows the server ran in the window less those of the interactive requests answered in it, per
second (the bulk work done; a bulk request has no deadline, so all of it is in time), against the capacity left
after the interactive load (or the bulk load this trace offered, when that is less: at 0.8x a handful of Poisson
arrivals). A noisy machine's capacity moves between the calibration and the window (10-25% within minutes on a
2-core cloud CPU): ``--recalibrate`` measures it again after each cell and adds the goodput over the capacity left
by the mean of the two measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402

INTERACTIVE = {"batch_size": 1}  # the server's default chain: restart, 10 calls
BULK = {"batch_size": 16, "steps": 50, "sampler": "ddim", "timestep_spacing": "trailing"}
INTERACTIVE_CALLS, BULK_CALLS = 10, 16 * 50


def start(mode: str, model: Path, compile_setting: str, device: str | None = None) -> ServerProcess:
    env = {"DDPM_COMPILE": compile_setting, "DDPM_COMPILE_BEFORE_READY": "true",
           "DDPM_THREADS": "1", "DDPM_MAX_BATCH": "64", "DDPM_RESPONSE_CACHE_MB": "0", "DDPM_MAX_QUEUE": "100000",
           "DDPM_MAX_IMAGES_PER_CLIENT": "100000", "DDPM_MAX_CALLS_PER_CLIENT": "100000000", "DDPM_REQUEST_TIMEOUT_S": "3600",
           "DDPM_LOG_LEVEL": "warning"}  # fmt: skip
    if mode == "before":
        env.update(DDPM_MAX_RESIDENT="64", DDPM_MAX_SLOWDOWN="0", DDPM_TUNE_CALL_SIZE="false")
    if device is not None:
        env["DDPM_DEVICE"] = device
    server = ServerProcess(model, **env)
    server.wait_ready(900)  # compiling: minutes on a CPU (the inductor cache makes the next start fast)
    return server


def alone_latency(url: str) -> float:
    with httpx.Client(base_url=url, timeout=120) as http:
        times = []
        for seed in range(8):
            t = time.monotonic()
            http.post("/generate", json={"seed": 10_000 + seed, **INTERACTIVE}).raise_for_status()
            times.append(time.monotonic() - t)
    return statistics.median(times[2:])


def engine_counts(url: str) -> dict[str, float]:
    """The server's running totals: U-Net rows run (the sum of its batch occupancy over iterations), iterations,
    and seconds spent in them (U-Net call and step; the rest of the engine thread's time is host work or idle)."""
    from tests.prometheus_text import sample_value

    text = httpx.get(url + "/metrics", timeout=10).text
    return {"rows": sample_value(text, "ddpm_batch_occupancy_sum"), "iterations": sample_value(text, "ddpm_iterations_total"),
            "busy_s": sample_value(text, "ddpm_iteration_duration_seconds_sum"),
            # calls run eagerly because no compiled graph covered their shape (the compile thread builds it meanwhile)
            "compile_fallbacks": sample_value(text, "ddpm_compile_fallbacks_total")}  # fmt: skip


def capacity(url: str, seconds: float, warm_s: float = 5.0) -> float:
    """U-Net row-calls per second with the batch kept full (closed-loop bulk requests, 96 images in flight),
    read from the server's own count of rows per iteration (``ddpm_batch_occupancy_sum``), after ``warm_s``
    of the same load (the batch fills; the server learns its call size: service/engine/call_size.py)."""

    async def run() -> float:
        end = time.monotonic() + seconds + warm_s
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:

            async def client(i: int) -> None:
                seed = i * 1000
                while time.monotonic() < end:
                    (await http.post("/generate", json={"seed": seed, **BULK})).raise_for_status()
                    seed += 1

            tasks = [asyncio.create_task(client(i)) for i in range(6)]
            await asyncio.sleep(warm_s)
            before, t = engine_counts(url), time.monotonic()
            await asyncio.sleep(seconds)
            after, elapsed = engine_counts(url), time.monotonic() - t
            d = {k: after[k] - before[k] for k in after}
            print(f"capacity: {d['rows'] / elapsed:.1f} row-calls/s, engine busy {d['busy_s'] / elapsed:.3f}, "
                  f"{d['rows'] / max(1.0, d['iterations']):.1f} rows an iteration, {d['compile_fallbacks']:.0f} compile fallbacks",
                  file=sys.stderr)  # fmt: skip
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return d["rows"] / elapsed

    return asyncio.run(run())


def trace(load: float, share: float, cap: float, seconds: float, seed: int) -> list[tuple[float, str]]:
    """Poisson arrivals: interactive at ``share`` of the capacity, bulk at the rest of ``load`` x capacity.
    A Poisson process conditioned on its count: each kind's count is its rate x ``seconds`` (rounded) and
    the arrival times uniform in the window, so a cell offers the load it is named for (a few free draws of
    16-image requests in 60 s can offer half of it or twice it)."""
    rng = random.Random(seed)
    rates = {"interactive": share * cap / INTERACTIVE_CALLS, "bulk": max(0.0, load - share) * cap / BULK_CALLS}
    arrivals = [(rng.uniform(0.0, seconds), kind) for kind, rate in rates.items() for _ in range(round(rate * seconds))]
    return sorted(arrivals)


def p50_p99(values: list[float]) -> list[float] | None:
    from load_test import percentile  # benchmarks/, this script's folder

    return [round(percentile(values, q), 4) for q in (0.5, 0.99)] if values else None


def replay(url: str, arrivals: list[tuple[float, str]], deadline_s: float, mode: str, seconds: float,
           lead_in_s: float = 0.0) -> dict[str, object]:
    """Send ``arrivals`` (seconds from the trace's start) open-loop; measure the window from ``lead_in_s`` to
    ``lead_in_s + seconds``: the engine's counts over it and the requests that arrived in it."""
    results: list[dict[str, object]] = []
    window: dict[str, float] = {}

    async def one(http: httpx.AsyncClient, at: float, kind: str, seed: int) -> None:
        body: dict[str, object] = {"seed": seed, **(INTERACTIVE if kind == "interactive" else BULK)}
        if mode == "priorities":
            body.update({"priority": 0, "deadline_s": deadline_s} if kind == "interactive" else {"priority": 5})
        sent = time.monotonic()
        r = await http.post("/generate", json=body)
        latency = time.monotonic() - sent
        timings = r.json()["timings"] if r.status_code == 200 and kind == "interactive" else {}
        results.append({"kind": kind, "at": at, "latency": latency, "status": r.status_code, "done_at": time.monotonic() - t0,
                        # the engine's part (arrival at the engine to the image done) and the server's (arrival to answer)
                        "engine_s": timings.get("queue_wait_s", 0.0) + timings.get("generation_s", 0.0),
                        "server_s": timings.get("total_s", 0.0)})  # fmt: skip

    async def run() -> None:
        nonlocal t0
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
            t0 = time.monotonic()

            async def count_window() -> None:
                await asyncio.sleep(max(0.0, lead_in_s - (time.monotonic() - t0)))
                before, opened = engine_counts(url), time.monotonic()
                await asyncio.sleep(max(0.0, lead_in_s + seconds - (time.monotonic() - t0)))
                after, window["elapsed"] = engine_counts(url), time.monotonic() - opened
                window.update({k: after[k] - before[k] for k in after}, opened=opened - t0)

            counter = asyncio.create_task(count_window())
            tasks = []
            for i, (at, kind) in enumerate(arrivals):
                await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
                tasks.append(asyncio.create_task(one(http, at, kind, 100_000 + i)))
            await counter
            # the window's answers: wait a little past its end for the interactive ones, then cancel the rest (bulk
            # answers after the window count for nothing, and under an overload they would hold the wait to its end:
            # 10 s a cell, 20 s of a GPU session's 15 minutes)
            interactive = [task for task, (_, kind) in zip(tasks, arrivals, strict=True) if kind == "interactive"]
            if interactive:
                await asyncio.wait(interactive, timeout=max(10.0, 10 * deadline_s))
            for task in tasks:
                task.cancel()

    t0 = 0.0
    asyncio.run(run())
    start, end = window["opened"], window["opened"] + window["elapsed"]
    in_window = [r for r in results if float(r["at"]) >= lead_in_s]  # type: ignore[arg-type]
    inter = [r for r in in_window if r["kind"] == "interactive"]
    sent_inter = sum(1 for at, kind in arrivals if kind == "interactive" and at >= lead_in_s)
    ok = [r for r in inter if r["status"] == 200]
    within = [r for r in ok if float(r["latency"]) <= deadline_s]  # type: ignore[arg-type]
    bulk_done = [r for r in results if r["kind"] == "bulk" and r["status"] == 200 and start <= float(r["done_at"]) <= end]  # type: ignore[arg-type]
    lateness = max((float(r["latency"]) - deadline_s for r in ok), default=0.0)  # type: ignore[arg-type]
    late = [r for r in ok if float(r["latency"]) > deadline_s]  # type: ignore[arg-type]
    outside = [float(r["latency"]) - float(r["engine_s"]) for r in ok]  # type: ignore[arg-type]
    in_server = [float(r["server_s"]) - float(r["engine_s"]) for r in ok]  # type: ignore[arg-type]
    # bulk work done in the window: every U-Net row the server ran, less the interactive requests' (those answered in it)
    answered = [r for r in results if r["kind"] == "interactive" and r["status"] == 200]
    interactive_rows = sum(INTERACTIVE_CALLS for r in answered if start <= float(r["done_at"]) <= end)  # type: ignore[arg-type]
    bulk_rows_per_s = (window["rows"] - interactive_rows) / window["elapsed"]
    return {"interactive_sent": sent_inter, "interactive_within_deadline": round(len(within) / max(1, sent_inter), 4),
            "interactive_refused": sum(1 for r in inter if r["status"] == 503), "interactive_p50_s": round(statistics.median(
                [float(r["latency"]) for r in ok]), 3) if ok else None,  # type: ignore[arg-type]
            "worst_lateness_s": round(lateness, 3),
            # where a late answer's time went: late already when the engine finished it, or only by the time outside it
            # (the server's HTTP work before and after the engine, the network, this client's event loop)
            "late_in_engine": sum(1 for r in late if float(r["engine_s"]) > deadline_s),  # type: ignore[arg-type]
            "outside_engine_s_p50_p99": p50_p99(outside), "server_outside_engine_s_p50_p99": p50_p99(in_server),
            "bulk_images_per_s": round(len(bulk_done) * 16 / seconds, 2),
            "bulk_row_calls_per_s": round(bulk_rows_per_s, 1),
            # where the window's time went: the share the engine spent in iterations, their mean rows, and rows/s in them
            "engine_busy_share": round(window["busy_s"] / window["elapsed"], 3),
            "rows_per_iteration": round(window["rows"] / max(1.0, window["iterations"]), 2),
            "row_calls_per_busy_s": round(window["rows"] / max(1e-9, window["busy_s"]), 1),
            "compile_fallbacks": int(window["compile_fallbacks"])}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mnist-28")
    p.add_argument("--seconds", type=float, default=60.0, help="the measured window of each cell")
    p.add_argument("--lead-in-s", type=float, default=None,
                   help="seconds of the trace before the window, unmeasured: the backlog builds (default: --seconds)")
    p.add_argument("--loads", default="0.8,1.2,1.5")
    p.add_argument("--interactive-share", type=float, default=0.1, help="of the capacity, in U-Net row-calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="priorities,before")
    p.add_argument("--deadline-s", type=float, default=None, help="the interactive deadline (default: 3x the alone latency measured)")
    p.add_argument("--capacity", type=float, default=None,
                   help="row-calls/s the loads are multiples of (default: measured); with --deadline-s, A/B rounds replay one trace")
    p.add_argument("--device", default=None, help="the server's DDPM_DEVICE (default: its own choice, the GPU where there is one)")
    p.add_argument("--calibrate-s", type=float, default=20.0, help="seconds the capacity is measured over")
    p.add_argument("--warm-s", type=float, default=30.0, help="seconds of the same load before it (the server learns its call size)")
    p.add_argument("--recalibrate", action="store_true", help="measure the capacity again after each cell (a noisy machine's drift)")
    p.add_argument("--compile", default="off", choices=["off", "auto"],
                   help="the server's DDPM_COMPILE; auto waits for the compiled graphs before measuring (its default serving path)")
    args = p.parse_args()
    lead_in = args.seconds if args.lead_in_s is None else args.lead_in_s
    from ddpm.precision import cpu_capability

    print(f"CPU: {cpu_capability()}", file=sys.stderr)
    rows = []
    for mode in args.modes.split(","):
        server = start(mode, args.model, args.compile, args.device)
        try:
            alone = alone_latency(server.url)
            measured = capacity(server.url, args.calibrate_s, warm_s=args.warm_s)  # also when given: the call size is learnt meanwhile
            cap = measured if args.capacity is None else args.capacity
            deadline = 3 * alone if args.deadline_s is None else args.deadline_s
            info = httpx.get(server.url + "/info", timeout=10).json()
            print(json.dumps({"mode": mode, "device": info["device"], "precision": info["precision"], "compiled": info["compiled"],
                              "alone_latency_s": round(alone, 3), "deadline_s": round(deadline, 3),
                              "capacity_row_calls_per_s": round(cap, 1), "measured_capacity": round(measured, 1)}), flush=True)  # fmt: skip
            loads = [float(x) for x in args.loads.split(",")]
            for n, load in enumerate(loads, 1):
                arrivals = trace(load, args.interactive_share, cap, lead_in + args.seconds, args.seed)
                cell = replay(server.url, arrivals, deadline, mode, args.seconds, lead_in)
                left = (1 - args.interactive_share) * cap  # bulk row-calls/s the capacity leaves after the interactive load
                offered = sum(BULK_CALLS for _, kind in arrivals if kind == "bulk") / (lead_in + args.seconds)  # this trace's bulk load
                cell.update(mode=mode, load=load, lead_in_s=lead_in, bulk_capacity_left_row_calls_per_s=round(left, 1),
                            bulk_goodput_over_left=round(float(cell["bulk_row_calls_per_s"]) / min(left, offered), 3))  # type: ignore[arg-type]  # fmt: skip
                if args.recalibrate or n < len(loads):  # the cell's tail drains before the next measurement
                    time.sleep(min(5.0, args.seconds))
                if args.recalibrate:
                    after = capacity(server.url, args.calibrate_s, warm_s=args.warm_s)
                    mean_left = (1 - args.interactive_share) * (measured + after) / 2
                    cell.update(capacity_after=round(after, 1),
                                bulk_goodput_over_mean_left=round(float(cell["bulk_row_calls_per_s"]) / min(mean_left, offered), 3))  # type: ignore[arg-type]  # fmt: skip
                print(json.dumps(cell), flush=True)
                rows.append(cell)
        finally:
            server.stop()
    print("\n| mode | load | interactive within deadline | refused | p50 s | worst lateness s | bulk row-calls/s | / min(left, offered) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in rows:
        print(f"| {c['mode']} | {c['load']} | {c['interactive_within_deadline']} | {c['interactive_refused']} | {c['interactive_p50_s']} | "
              f"{c['worst_lateness_s']} | {c['bulk_row_calls_per_s']} | {c['bulk_goodput_over_left']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
