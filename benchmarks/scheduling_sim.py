"""The scheduling benchmark's trace replayed on the real engine against a cost curve, on a simulated clock
(issue 37): what the step scheduler's policy makes of a device, without the device and without the noise.

    python benchmarks/scheduling_sim.py                              # the CPU curves and the H200's, 1.5x
    python benchmarks/scheduling_sim.py --curves h200 --loads 0.8,1.2,1.5 --seeds 0,1,2

The engine is ``service.engine.engine.Engine`` itself (admission control, the running batch, the step
scheduler, the cost model it learns), driven iteration by iteration as the engine thread drives it, with
the shipped model's shapes, a U-Net that returns zeros and a step that copies. Time is a simulated clock
(``time.monotonic`` and ``time.perf_counter`` replaced in this process): each U-Net call moves it on by
the curve's cost at the call's rows (linear between the listed sizes) plus ``--host-ms`` per iteration,
and a request of the trace is submitted at its own arrival time, mid-iteration when it falls there. What is
not modelled: the HTTP round trip, a fixed ``--overhead-ms`` added to each answer's latency (and to the
alone latency the deadline is built from); the noise of a real machine; the host time of the engine
itself beyond ``--host-ms``.

The trace and the figures are ``benchmarks/scheduling.py``'s: interactive requests (1 image, the default
restart chain of 10 calls, priority 0, deadline 3x their alone latency) making a tenth of the capacity,
bulk requests (16 images, 50-call DDIM, priority 5, no deadline) the rest of the load, Poisson arrivals;
the capacity is a full max batch's rows per second on the curve (``64 / cost(64)``, as the benchmark's
closed loop measures it); bulk goodput is the rows run in the window less the answered interactive
requests', over the capacity left after the interactive load (or the bulk load offered, when less). As the
benchmark's, the trace starts ``--lead-in-s`` (default: the window's length) before the measured window, and the
interactive figures count the requests that arrived in the window (before 2026-12-05 both measured from an empty
engine: ``--lead-in-s 0``).

This is a model, not a measurement: its figures say what the policy does with a curve, the real
benchmark says what a server does on a machine. Curves: ``cpu-eager`` and ``cpu-compiled`` (the shipped
U-Net, bf16, 1 thread, an AVX-512 EPYC, measured 2026-12-04 by a U-Net-only loop: BENCHMARKS
"Scheduling"), ``cpu-avx2-eager`` and ``cpu-avx2-compiled`` (fp32, an AVX2-only EPYC, 2026-12-05), ``h200``
(the compiled U-Net replayed as CUDA graphs: BENCHMARKS "GPU", batch 1/16/64/256).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scheduling import BULK, BULK_CALLS, INTERACTIVE, INTERACTIVE_CALLS, trace  # noqa: E402

from service.engine.iteration_cost import IterationCost  # noqa: E402

if TYPE_CHECKING:
    from ddpm.chain import ChainSpec
    from service.engine.engine import Engine

CURVES_MS = {  # rows -> ms of one U-Net call
    "cpu-eager": {1: 9.04, 2: 11.89, 4: 17.86, 6: 23.74, 8: 29.68, 12: 41.61, 16: 51.36, 24: 74.28, 32: 96.68, 48: 139.94, 64: 196.91},
    "cpu-compiled": {1: 5.66, 2: 8.17, 4: 13.17, 6: 18.14, 8: 23.3, 12: 33.17, 16: 41.86, 24: 61.98, 32: 83.81, 48: 130.7, 64: 191.09},
    "h200": {1: 0.429, 16: 0.676, 64: 0.935, 256: 2.145},
    # fp32 (the AVX2 default), 1 thread, a 2-core AMD EPYC without AVX-512, 2026-12-05: unet_cost_curve.py --rounds 4
    "cpu-avx2-eager": {1: 28.1, 2: 44.7, 4: 71.9, 6: 102.7, 8: 131.4, 12: 195.6, 16: 245.8, 24: 352.0, 32: 484.8, 48: 751.6, 64: 995.5},
    "cpu-avx2-compiled": {1: 20.2, 2: 33.9, 4: 62.0, 6: 86.4, 8: 112.7, 12: 167.0, 16: 216.9, 24: 325.3, 32: 429.6, 48: 654.2, 64: 859.6},
}  # fmt: skip
# the engine's own time per iteration (issue 35's figures)
HOST_MS = {"cpu-eager": 1.5, "cpu-compiled": 1.5, "h200": 0.3, "cpu-avx2-eager": 1.5, "cpu-avx2-compiled": 1.5}


def curve_cost(curve_name: str, host_s: float) -> IterationCost:
    """The curve as the engine's own cost model holds it: seconds per iteration (U-Net call + host), linear
    between the listed sizes and extrapolated past the largest as the engine extrapolates."""
    cost = IterationCost()
    for rows, ms in CURVES_MS[curve_name].items():
        cost.observe(rows, ms / 1e3 + host_s)
    return cost


class SimClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_loop_capacity(
    engine: Engine, bulk: tuple[int, ChainSpec], clock: SimClock, rows: dict[str, float], seconds: float = 20.0
) -> float:
    """Row-calls per second with 96 bulk images always in flight (``scheduling.capacity``'s 6 clients), counted
    over ``seconds`` after 5 s to fill the batch, on the simulated clock: what the benchmark's calibration
    measures, including the call size the engine learns meanwhile. ``rows["all"]``: every U-Net row run so far."""
    from ddpm.image_request import ImageRequest
    from service.engine.job import Job

    def submit() -> Job:
        return engine.submit(Job(ImageRequest(0, *bulk), timeout_s=3600, created=clock.now))

    flight = [submit() for _ in range(6)]

    def run_until(until: float) -> None:  # a finished request replaced by a new one, as a closed-loop client does
        while clock.now < until:
            engine._iterate()
            flight[:] = [job if not job.done else submit() for job in flight]

    run_until(clock.now + 5.0)  # the batch fills
    start, before = clock.now, rows["all"]
    run_until(start + seconds)
    rate = (rows["all"] - before) / (clock.now - start)
    for job in flight:
        job.cancel()
    while not engine.idle:
        engine._iterate()
    return rate


def simulate(
    curve_name: str, mode: str, load: float, seed: int, seconds: float, overhead_s: float, host_s: float, share: float,
    deadline_x: float = 3.0, guided: bool = False, lead_in_s: float = 0.0,
) -> dict[str, object]:
    """One cell. ``mode``: ``priorities`` (the fields sent, the engine's defaults) or ``before`` (no fields, one
    call's rows resident, no slowdown bound: what every request got before issue 37, as the benchmark's).
    ``guided``: the interactive requests ask the class-conditional model for a label with guidance w = 2
    (2 U-Net rows an image: the trace's interactive share of requests takes twice its share of rows).
    ``lead_in_s``: the trace starts that long before the window the cell is measured over (the benchmark's)."""
    import torch

    from ddpm.chain import ChainSpec
    from ddpm.image_request import ImageRequest
    from ddpm.model_source import load_model_source
    from service.engine.engine import Engine
    from service.engine.job import Job
    from service.settings import Settings

    server = Settings()  # the interactive request names no chain: the server's default one
    requests = {
        "interactive": (
            INTERACTIVE["batch_size"],
            ChainSpec(server.default_steps, server.default_sampler, spacing=server.default_timestep_spacing),
        ),
        "bulk": (BULK["batch_size"], ChainSpec(BULK["steps"], BULK["sampler"], spacing=BULK["timestep_spacing"])),
    }  # the benchmark's requests, as its HTTP bodies ask for them

    curve = curve_cost(curve_name, host_s)
    clock = SimClock()
    time.monotonic = clock  # type: ignore[assignment]  # the engine's every reading of time (this process only)
    time.perf_counter = clock  # type: ignore[assignment]
    torch.set_num_threads(1)
    model = load_model_source(ROOT / "models" / ("mnist-28-cond" if guided else "mnist-28"))
    if guided:
        requests["interactive"] = (*requests["interactive"], (0,), 2.0)  # type: ignore[assignment]
    width = 2 if guided else 1  # U-Net rows of an interactive image
    alone = INTERACTIVE_CALLS * curve.seconds(width) + overhead_s  # type: ignore[operator]
    deadline = deadline_x * alone
    pending: list[tuple[float, str]] = []
    jobs: list[tuple[str, Job]] = []
    t0 = clock.now
    counted = {"rows": 0, "calls": 0, "from": 0.0, "until": 0.0, "all": 0}  # U-Net rows (calls) ending in [from, until]; all rows
    engine: Engine

    def arrive_until(until: float) -> None:
        while pending and t0 + pending[0][0] <= until:
            at, kind = pending.pop(0)
            clock.now = max(clock.now, t0 + at)
            fields = {"priority": 0, "deadline_s": deadline} if kind == "interactive" else {"priority": 5}
            job = Job(
                ImageRequest(len(jobs), *requests[kind]), timeout_s=3600, created=clock.now, **(fields if mode == "priorities" else {})
            )  # type: ignore[arg-type]
            # the server learns how long an answer takes after its images (Engine.answered): here the HTTP round trip
            job.on_done = lambda done: engine.answered(done, done.finished + overhead_s)  # type: ignore[operator]
            try:
                engine.submit(job)
            except Exception as exc:  # a refusal (admission control): counted as a miss
                job.error = exc
            jobs.append((kind, job))

    def eps(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        start, rows = clock.now, x.shape[0]
        end = start + curve.seconds(rows)  # type: ignore[operator]
        counted["all"] += rows
        if counted["from"] <= end <= counted["until"]:
            counted["rows"] += rows
            counted["calls"] += 1
        arrive_until(end)  # requests that arrive while this call runs
        clock.now = end
        return torch.zeros_like(x)

    def copy_step(x, eps, coefs, seeds, counters, x0_prev=None, edit=None):  # type: ignore[no-untyped-def]
        return x.clone(), (x.clone() if x0_prev is not None else None)

    model.eps_model = eps
    before = {"max_resident": 64, "max_slowdown": 0.0, "tune_call_size": False}  # the server before issue 37
    engine = Engine(model, max_batch=64, max_queue=100_000, step_fn=copy_step, clock=clock,
                    **({"max_resident": 256, "tune_call_size": server.tune_call_size} if mode == "priorities" else before))  # fmt: skip
    for rows in (1, 2, 64):  # the server's warm-up sizes
        engine.cost.observe(rows, curve.seconds(rows))  # type: ignore[arg-type]
    with torch.inference_mode():
        cap = closed_loop_capacity(engine, requests["bulk"], clock, counted)  # the benchmark's calibration, on this engine
    arrivals = trace(load, share, cap, lead_in_s + seconds, seed)
    pending.extend(arrivals)
    t0 = clock.now
    start = t0 + lead_in_s  # the window
    counted.update({"rows": 0, "from": start, "until": start + seconds})
    end = start + seconds + 10 * deadline
    with torch.inference_mode():
        while clock.now < end and (pending or not engine.idle):
            if engine.idle:
                clock.now = t0 + pending[0][0]
                arrive_until(clock.now)
            engine._iterate()
    inter = [job for kind, job in jobs if kind == "interactive" and job.created >= start]  # those that arrived in the window
    answered = [job for job in inter if job.error is None and job.finished is not None]
    answered_in_window = [job for kind, job in jobs if kind == "interactive" and job.error is None and job.finished is not None
                          and start <= job.finished <= start + seconds]  # fmt: skip
    latency = [job.finished - job.created + overhead_s for job in answered]  # type: ignore[operator]
    within = sum(1 for s in latency if s <= deadline)
    interactive_rows = width * INTERACTIVE_CALLS * len(answered_in_window)
    offered = sum(BULK_CALLS for _, kind in arrivals if kind == "bulk") / (lead_in_s + seconds)
    left = (1 - width * share) * cap
    peak = max(rows / curve.seconds(rows) for rows in range(1, 65))  # type: ignore[operator]  # the curve's best rows/s
    bulk = (counted["rows"] - interactive_rows) / seconds
    return {"curve": curve_name, "mode": mode, "load": load, "seed": seed, "alone_s": round(alone, 4), "deadline_s": round(deadline, 4),
            "capacity": round(cap, 1), "call_size": engine.call_size.best, "interactive_sent": len(inter),
            "within_deadline": round(within / max(1, len(inter)), 4),
            "refused": sum(1 for job in inter if job.error is not None),
            "worst_lateness_s": round(max((s - deadline for s in latency), default=0.0), 4),
            "rows_per_iteration": round(counted["rows"] / max(1, counted["calls"]), 2),
            "bulk_row_calls_per_s": round(bulk, 1), "bulk_goodput": round(bulk / min(left, offered), 3),
            "bulk_over_peak_left": round(bulk / min(peak - width * share * cap, offered), 3)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", default="cpu-eager,cpu-compiled,h200")
    p.add_argument("--loads", default="1.5")
    p.add_argument("--modes", default="priorities,before")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--lead-in-s", type=float, default=None, help="the trace before the window, unmeasured (default: --seconds)")
    p.add_argument("--overhead-ms", type=float, default=15.0, help="per answer: the HTTP round trip and the PNG")
    p.add_argument("--host-ms", type=float, default=None, help="per iteration (default: the curve's own)")
    p.add_argument("--interactive-share", type=float, default=0.1)
    p.add_argument("--deadline-x", type=float, default=3.0, help="the interactive deadline as a multiple of its alone latency")
    p.add_argument("--guided", action="store_true", help="interactive requests ask the conditional model for a label, guided (w 2)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    lead_in = args.seconds if args.lead_in_s is None else args.lead_in_s
    if args.cell is not None:  # one cell, in its own process: the clock replacement stays there
        curve, mode, load, seed = args.cell.split(",")
        host = HOST_MS[curve] if args.host_ms is None else args.host_ms
        cell = simulate(curve, mode, float(load), int(seed), args.seconds, args.overhead_ms / 1e3, host / 1e3, args.interactive_share,
                        args.deadline_x, args.guided, lead_in)
        print(json.dumps(cell))
        return 0
    import subprocess

    rows = []
    for curve, mode in itertools.product(args.curves.split(","), args.modes.split(",")):
        for load in args.loads.split(","):
            cells = []
            for seed in args.seeds.split(","):
                cmd = [sys.executable, __file__, "--cell", f"{curve},{mode},{load},{seed}", "--seconds", str(args.seconds),
                       "--overhead-ms", str(args.overhead_ms), "--interactive-share", str(args.interactive_share),
                       "--deadline-x", str(args.deadline_x), "--lead-in-s", str(lead_in)]  # fmt: skip
                cmd += ["--guided"] if args.guided else []
                if args.host_ms is not None:
                    cmd += ["--host-ms", str(args.host_ms)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                cells.append(json.loads(out.strip().splitlines()[-1]))
                print(out.strip().splitlines()[-1], flush=True)
            rows.append((curve, mode, load, cells))
    print(
        "\n| curve | mode | load | deadline s | interactive within deadline (per seed) | refused | worst lateness s | "
        "bulk goodput (per seed) | median | over the curve's peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for curve, mode, load, cells in rows:
        within = " / ".join(str(c["within_deadline"]) for c in cells)
        goodput = " / ".join(str(c["bulk_goodput"]) for c in cells)
        median = statistics.median(float(c["bulk_goodput"]) for c in cells)
        peak = statistics.median(float(c["bulk_over_peak_left"]) for c in cells)
        print(f"| {curve} | {mode} | {load} | {cells[0]['deadline_s']} | {within} | {sum(int(c['refused']) for c in cells)} | "
              f"{max(float(c['worst_lateness_s']) for c in cells)} | {goodput} | {median} | {peak} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
