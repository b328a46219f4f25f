"""Bounded load against a real `ddpm serve` on loopback: burst (overload), soak and sweep modes.

    python benchmarks/load_test.py burst --requests 300 --max-queue 32      # fast 503s, nothing lost, bounded memory
    python benchmarks/load_test.py soak --seconds 120 --concurrency 8        # steady mixed load: flat memory and latency
    python benchmarks/load_test.py sweep --model models/mnist-28            # concurrency 1/4/16/64, continuous vs request
    python benchmarks/load_test.py memory --model models/mnist-28 --steps 3 # peak RSS by batch size, per extra sample

Starts its own server on a tiny random U-Net (or --model DIR) on 127.0.0.1, sends a fixed number of
requests (burst, sweep) or runs for a fixed time (soak), then stops. Prints one JSON report (sweep:
also a Markdown table).

sweep: closed-loop clients (each sends its next request when the last is answered) with a 50/50 mix
of short (10-step) and long (100-step) one-image requests, at each concurrency, once per scheduling
mode (``DDPM_SCHEDULING=continuous|request``, one server each). Throughput is counted in image-steps
(U-Net sample evaluations) per second so mixed chain lengths compare; the offline sampler at batch 16
with the same model, threads and compile setting, measured first in this process, is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.names import COMPILE_SETTINGS
from tests.server_process import ServerProcess, cpu_seconds
from tests.tiny_model import save_tiny_model


def rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one(client: httpx.AsyncClient, seed: int, steps: int, n: int = 1, **fields: object) -> tuple[int, float]:
    start = time.monotonic()
    try:
        r = await client.post("/generate", json={"seed": seed, "batch_size": n, "steps": steps, **fields})
        return r.status_code, time.monotonic() - start
    except httpx.HTTPError:
        return -1, time.monotonic() - start


async def one_raw(port: int, seed: int, steps: int, timeout: float) -> tuple[int, float]:
    """One POST /generate over a bare HTTP/1.1 connection (asyncio streams, Connection: close).

    httpx spends ~9 ms of CPU per request when hundreds open at once, ~10x what the server spends on a
    503, so a burst measured with it times the client; this client costs a fraction of that.
    """
    body = json.dumps({"seed": seed, "batch_size": 1, "steps": steps}).encode()
    head = f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        status = await asyncio.wait_for(reader.readline(), timeout)
        await asyncio.wait_for(reader.read(), timeout)  # the rest, until the server closes
        writer.close()
        return int(status.split()[1]), time.monotonic() - start
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return -1, time.monotonic() - start


async def burst(server: ServerProcess, args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.requests)
    server_cpu, client_cpu = cpu_seconds(server.proc.pid), cpu_seconds()
    if args.client == "raw":
        results = await asyncio.gather(*(one_raw(server.port, i, args.steps, args.timeout) for i in range(args.requests)))
    else:
        async with httpx.AsyncClient(base_url=server.url, timeout=args.timeout, limits=limits) as client:
            results = await asyncio.gather(*(one(client, i, args.steps) for i in range(args.requests)))
    server_cpu, client_cpu = cpu_seconds(server.proc.pid) - server_cpu, cpu_seconds() - client_cpu
    codes = [c for c, _ in results]
    rejected = [t for c, t in results if c == 503]
    served = [t for c, t in results if c == 200]
    _, peak = rss_kb(server.proc.pid)
    return {
        "mode": "burst",
        "client": args.client,
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
        # who is busy: with the server on its own core, a 300-connection burst costs the httpx client ~10x
        # the server's CPU (hence --client raw, the default)
        "server_cpu_s": round(server_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
        # inside the route (after the body is read and parsed): what the server itself spends on a 503
        "server_reject_handler_mean_ms": round(
            1e3
            * server.metric('ddpm_request_duration_seconds_sum{outcome="rejected"}')
            / max(1.0, server.metric('ddpm_request_duration_seconds_count{outcome="rejected"}')),
            3,
        ),
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


SHORT_STEPS, LONG_STEPS = 10, 100
MIXES: dict[str, list[dict[str, object]]] = {
    "steps": [{"steps": SHORT_STEPS, "sampler": "ddpm"}, {"steps": LONG_STEPS, "sampler": "ddpm"}],
    "samplers": [{"steps": 20, "sampler": "dpmsolver++"}, {"steps": 50, "sampler": "ddim"}, {"steps": 1000, "sampler": "ddpm"}],
    # a class-conditional model (--model): guided (2 U-Net rows per image-step), conditional and unconditional requests
    "guidance": [
        {"steps": 20, "sampler": "sde-dpmsolver++", "class_label": 7, "guidance_scale": 2.0},
        {"steps": 20, "sampler": "sde-dpmsolver++", "class_label": 3, "guidance_scale": 0.0},
        {"steps": 20, "sampler": "sde-dpmsolver++"},
    ],
}


HISTOGRAMS = ("ddpm_queue_wait_seconds", "ddpm_batch_occupancy", "ddpm_iteration_duration_seconds")


def histogram_totals(server: ServerProcess) -> dict[str, tuple[float, float]]:
    """(sum, count) of each server histogram in HISTOGRAMS, for per-cell figures by difference."""
    return {name: (server.metric(f"{name}_sum"), server.metric(f"{name}_count")) for name in HISTOGRAMS}


def mean_between(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], name: str) -> float:
    return (after[name][0] - before[name][0]) / max(1.0, after[name][1] - before[name][1])


async def closed_loop(server: ServerProcess, concurrency: int, per_client: int, timeout: float, mix: str = "steps") -> dict[str, object]:
    results: list[tuple[int, int, float, int]] = []  # (steps, status, latency, U-Net rows per image-step)
    kinds = MIXES[mix]

    async def client_loop(w: int, client: httpx.AsyncClient) -> None:
        for i in range(per_client):
            fields = kinds[(w + i) % len(kinds)]
            code, dt = await one(client, 10_000 * w + i, **fields)  # type: ignore[arg-type]
            results.append((int(fields["steps"]), code, dt, 2 if fields.get("guidance_scale") else 1))

    before = histogram_totals(server)
    limits = httpx.Limits(max_connections=concurrency)
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(w, client) for w in range(concurrency)))
    wall = time.monotonic() - start
    after = histogram_totals(server)
    iteration = "ddpm_iteration_duration_seconds"
    ok = [(steps, dt) for steps, code, dt, _ in results if code == 200]
    rows = sum(steps * per_step for steps, code, _, per_step in results if code == 200)
    latencies = [dt for _, dt in ok]
    short_steps = min(int(k["steps"]) for k in kinds)
    short = [dt for steps, dt in ok if steps == short_steps]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(ok) / wall, 3),
        "image_steps_per_s": round(sum(steps for steps, _ in ok) / wall, 1),
        "unet_rows_per_s": round(rows / wall, 1),  # = image_steps_per_s unless requests are guided (2 rows each)
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "short_latency_p50_s": round(percentile(short, 0.5), 3),
        "queue_wait_mean_s": round(mean_between(before, after, "ddpm_queue_wait_seconds"), 3),
        "batch_occupancy_mean": round(mean_between(before, after, "ddpm_batch_occupancy"), 2),
        # time inside iterations (U-Net + step) vs wall time: the rest is the engine loop, HTTP and the client
        "iteration_mean_ms": round(1e3 * mean_between(before, after, iteration), 2),
        "busy_share": round((after[iteration][0] - before[iteration][0]) / wall, 3),
    }


def offline_image_steps_per_s(model_dir: Path, batch: int, steps: int, compile_setting: str) -> float:
    """The offline sampler's rate at one batch size, with the server's hot path (after a warm-up run)."""
    import torch

    from ddpm.inference_compile import hot_path
    from ddpm.model_source import load_model_source
    from ddpm.offline_sampler import sample
    from ddpm.seeding import image_seeds
    from kernels.philox import seeds_to_tensor

    torch.set_num_threads(1)  # as the server (ServerProcess sets DDPM_THREADS=1)
    model = load_model_source(model_dir)
    fast = hot_path(model.eps_model, model.module, "cpu", compile_setting)
    seeds = seeds_to_tensor(image_seeds(0, batch))
    with torch.inference_mode():
        for _warm_then_timed in range(2):
            start = time.monotonic()
            sample(fast.eps_model, model.schedule, seeds, model.image_shape, steps=steps, step_fn=fast.step_fn,
                   variance_type=model.variance_type, clip_denoised=model.clip_denoised)  # fmt: skip
    return batch * steps / (time.monotonic() - start)


def sweep(model: Path, args: argparse.Namespace) -> dict[str, object]:
    offline = offline_image_steps_per_s(model, 16, (SHORT_STEPS + LONG_STEPS) // 2, args.compile)
    cells: dict[str, list[dict[str, object]]] = {}
    for mode in args.modes.split(","):
        server = ServerProcess(model, DDPM_MAX_QUEUE="100000", DDPM_MAX_BATCH=str(args.max_batch), DDPM_MAX_IMAGES_PER_CLIENT="100000",
                               DDPM_SCHEDULING=mode, DDPM_COMPILE=args.compile, DDPM_LOG_FORMAT="json")  # fmt: skip
        try:
            server.wait_ready(timeout=600)
            cells[mode] = []
            for c in [int(x) for x in args.concurrencies.split(",")]:
                per_client = max(2, args.requests // c)
                cells[mode].append(asyncio.run(closed_loop(server, c, per_client, args.timeout, args.mix)))
                print(json.dumps({"mode": mode, **cells[mode][-1]}), file=sys.stderr, flush=True)
            _, peak = rss_kb(server.proc.pid)
        finally:
            server.stop()
        cells[mode + "_peak_rss_mib"] = round(peak / 1024, 1)  # type: ignore[assignment]
    return {"mode": "sweep", "mix": MIXES[args.mix], "offline_batch16_image_steps_per_s": round(offline, 1), "cells": cells}


def sweep_table(report: dict[str, object]) -> str:
    cells = report["cells"]
    offline = report["offline_batch16_image_steps_per_s"]
    lines = ["| mode | concurrency | images/s | image-steps/s | p50 s | p95 s | p99 s | short p50 s | queue wait s | occupancy "
             "| iteration ms | busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode in ("continuous", "request"):
        for r in cells.get(mode, []):  # type: ignore[attr-defined]
            lines.append(f"| {mode} | {r['concurrency']} | {r['images_per_s']} | {r['image_steps_per_s']} | {r['latency_p50_s']} | "
                         f"{r['latency_p95_s']} | {r['latency_p99_s']} | {r['short_latency_p50_s']} | {r['queue_wait_mean_s']} | "
                         f"{r['batch_occupancy_mean']} | {r['iteration_mean_ms']} | {r['busy_share']:.0%} |")  # fmt: skip
    cont = {r["concurrency"]: r for r in cells.get("continuous", [])}  # type: ignore[attr-defined]
    req = {r["concurrency"]: r for r in cells.get("request", [])}  # type: ignore[attr-defined]
    if 16 in cont:
        lines.append(f"\nserved image-steps/s at concurrency 16 / offline sampler at batch 16 ({offline}): "
                     f"{cont[16]['image_steps_per_s'] / offline:.2f}; U-Net rows/s ({cont[16]['unet_rows_per_s']}) / offline: "
                     f"{cont[16]['unet_rows_per_s'] / offline:.2f}")  # fmt: skip
    for c in sorted(set(cont) & set(req)):
        lines.append(f"concurrency {c}: short-request p50 request-level / continuous = "
                     f"{req[c]['short_latency_p50_s'] / max(1e-9, cont[c]['short_latency_p50_s']):.2f}x, "
                     f"throughput continuous / request-level = "
                     f"{cont[c]['image_steps_per_s'] / max(1e-9, req[c]['image_steps_per_s']):.2f}")  # fmt: skip
    return "\n".join(lines)


def memory(model: Path, args: argparse.Namespace) -> dict[str, object]:
    """Server RSS per batch size: one server per size n (DDPM_MAX_BATCH=n, so warm-up runs at n too):
    RSS once ready, then peak RSS (VmHWM) after one request of n images."""
    rows = {}
    for n in [int(b) for b in args.batches.split(",")]:
        server = ServerProcess(model, DDPM_MAX_BATCH=str(n), DDPM_MAX_IMAGES_PER_REQUEST=str(n), DDPM_COMPILE=args.compile)
        try:
            server.wait_ready(timeout=600)
            ready, _ = rss_kb(server.proc.pid)
            r = httpx.post(server.url + "/generate", json={"seed": n, "batch_size": n, "steps": args.steps}, timeout=args.timeout)
            assert r.status_code == 200, r.text
            rows[n] = (ready, rss_kb(server.proc.pid)[1])
        finally:
            server.stop()
    sizes = sorted(rows)
    per_sample = (rows[sizes[-1]][1] - rows[sizes[0]][1]) / max(1, sizes[-1] - sizes[0])
    return {
        "mode": "memory",
        "compile": args.compile,
        "rss_when_ready_mib_by_batch": {n: round(ready / 1024, 1) for n, (ready, _) in rows.items()},
        "peak_rss_mib_by_batch": {n: round(peak / 1024, 1) for n, (_, peak) in rows.items()},
        "peak_per_extra_sample_kib": round(per_sample, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["burst", "soak", "sweep", "memory"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--concurrencies", default="1,4,16,64", help="sweep: client concurrencies")
    parser.add_argument("--modes", default="continuous,request", help="sweep: scheduling modes, one server each")
    parser.add_argument("--mix", choices=sorted(MIXES), default="steps",
                        help="sweep: steps (10/100-step ddpm), samplers (20-step dpmsolver++, 50-step ddim, 1000-step ddpm) "
                             "or guidance (guided, conditional, unconditional 20-step requests; a class-conditional --model)")  # fmt: skip
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, default="auto", help="sweep, memory: the server's DDPM_COMPILE")
    parser.add_argument("--batches", default="1,16,64,256", help="memory: batch sizes (one server each)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw", help="burst: the HTTP client (raw: bare asyncio streams)")
    parser.add_argument("--server-cpus", default="", help="burst, soak: pin the server to these CPUs (client: taskset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else save_tiny_model(Path(tmp) / "tiny")
        if args.mode == "sweep":
            report = sweep(model, args)
            print(json.dumps(report, indent=2))
            print(sweep_table(report))
            return
        if args.mode == "memory":
            print(json.dumps(memory(model, args), indent=2))
            return
        env = {"DDPM_MAX_QUEUE": str(args.max_queue), "DDPM_MAX_BATCH": str(args.max_batch), "DDPM_MAX_IMAGES_PER_CLIENT": "100000",
               "DDPM_LOG_FORMAT": "json"}  # fmt: skip
        server = ServerProcess(model, **env)
        if args.server_cpus:  # keep the load generator off the server's cores (set before the server starts its threads)
            os.sched_setaffinity(server.proc.pid, {int(c) for c in args.server_cpus.split(",")})
        try:
            server.wait_ready(timeout=600)  # a cold inductor cache compiles for minutes on one core
            report = asyncio.run(burst(server, args) if args.mode == "burst" else soak(server, args))
        finally:
            server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
