"""The engine's own host time per iteration, with a U-Net (and a fused step) that cost nothing.

    python benchmarks/engine_overhead.py                          # rows 1, 8, 64; null step and the real (eager) step
    python benchmarks/engine_overhead.py --baseline 2f0dda3       # the same cells on another commit's engine, alternated
    python benchmarks/engine_overhead.py --json                   # one JSON line per cell
    python benchmarks/engine_overhead.py --resident-x 2           # twice a call's rows resident: the step scheduler chooses
    python benchmarks/engine_overhead.py --trace --baseline HEAD~ # along the scheduling simulator's 1.5x trace

``Engine`` without HTTP, 1 torch thread, the shipped model's shapes with its eps replaced by
``zeros_like`` (``unet: null``), the fused step replaced by a copy (``step: null``) or the real one
(``step: real``, the eager PyTorch twin on CPU), and ``rows`` concurrent 1-image jobs of the server's
default chain (restart, 10 calls; ``--resident-x`` X: X x ``rows`` jobs resident, ``rows`` a call, so the
step scheduler chooses which rows run each iteration): each finished job is replaced by a new one between iterations (the
submission, a request thread's work in the server, is not timed), so the batch stays full and a tenth
of its rows leave and join every iteration, as under steady load. The engine's iteration (admit, eps,
step, advance: ``Engine._iterate``, the engine thread's loop body) is driven from one thread and timed
over ``--iterations`` iterations after a warm-up: on a GPU, the time the host needs before the device
can be given the next iteration.

``--trace``: instead, the engine along ``scheduling_sim.py``'s 1.5x trace (the cpu-compiled curve, seed 0, its
calibration first): interactive requests with deadlines and 16-image bulk requests, up to 256 rows resident and calls
of ~5-24 (deadlines and the learned call size), rows chosen, preempted and moved every iteration, as on a server under
overload. The simulator's U-Net and step are free on the wall clock, so the wall time of ``Engine._iteration`` is the
engine's host time (its admit, schedule and advance, and the copy that stands in for the step); the mean over the
trace's iterations (the calibration's not counted) is reported.

``--baseline REV`` checks REV out in a temporary git worktree and runs each cell there too, in its own
process, alternating with this tree's (these machines drift: only ratios measured side by side mean
anything); the ratio column is this tree's time over REV's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = [(rows, step) for step in ("null", "real") for rows in (1, 8, 64)]


def measure(root: Path, rows: int, step_kind: str, iterations: int, warmup: int, resident_x: float = 1.0) -> float:
    """µs per iteration of the engine at ``root`` (imported from there)."""
    sys.path.insert(0, str(root))
    import torch

    from ddpm.chain import ChainSpec, default_step_fn
    from ddpm.image_request import ImageRequest
    from ddpm.model_source import load_model_source
    from service.engine.engine import Engine
    from service.engine.job import Job

    torch.set_num_threads(1)
    model = load_model_source(root / "models" / "mnist-28")
    model.eps_model = lambda x, t, *labels: torch.zeros_like(x)  # the null U-Net

    def null_step(x, eps, coefs, seeds, counters, x0_prev=None, edit=None):  # type: ignore[no-untyped-def]
        return x.clone(), (x.clone() if x0_prev is not None else None)

    jobs = round(rows * resident_x)
    resident = {"max_resident": jobs + rows} if jobs > rows else {}  # all of them resident, a call's rows kept for newcomers
    engine = Engine(model, max_batch=rows, max_queue=4 * jobs, step_fn=null_step if step_kind == "null" else default_step_fn(), **resident)
    chain = ChainSpec(10, "restart", spacing="trailing")  # the server's default chain
    finished: list[Job] = []
    seeds = iter(range(10**9))

    def submit() -> None:
        job = Job(ImageRequest(next(seeds), 1, chain), timeout_s=3600)
        job.on_done = finished.append
        engine.submit(job)

    for _ in range(jobs):
        submit()
    timed = 0.0
    with torch.inference_mode():
        for i in range(warmup + iterations):
            start = time.perf_counter()
            engine._iterate()  # the engine thread's loop body, driven here: nothing else competes for the GIL
            if i >= warmup:
                timed += time.perf_counter() - start
            while finished:  # closed loop, outside the timed part (a request thread's work in the server)
                finished.pop()
                submit()
    return timed / iterations * 1e6


def measure_trace(root: Path, load: float) -> float:
    """µs of the engine's host time per iteration along the scheduling simulator's trace at ``load``, the engine's
    code from ``root``, the simulator's from this tree."""
    sys.path.insert(0, str(root))
    from service.engine.engine import Engine  # the engine under test: imported before the simulator puts this tree first

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scheduling_sim

    sys.path.insert(0, str(root))  # whatever the simulator imports later comes from root too
    real = time.perf_counter  # the simulator replaces it with its clock
    spent: list[float] = []
    iteration, trace = Engine._iteration, scheduling_sim.trace

    def timed(self: Engine) -> None:
        start = real()
        iteration(self)
        spent.append(real() - start)

    def trace_after_calibration(*args: object) -> list[tuple[float, str]]:
        spent.clear()  # the calibration's iterations are not counted
        return trace(*args)  # type: ignore[arg-type]

    Engine._iteration = timed  # type: ignore[method-assign]
    scheduling_sim.trace = trace_after_calibration  # type: ignore[assignment]
    curve = "cpu-compiled"
    scheduling_sim.simulate(curve, "priorities", load, 0, 60.0, 0.015, scheduling_sim.HOST_MS[curve] / 1e3, 0.1)
    return statistics.mean(spent) * 1e6


def run_cell(root: Path, rows: int | str, step: str, iterations: int, warmup: int, resident_x: float) -> float:
    """One cell in a fresh process (its own torch, its own engine code)."""
    out = subprocess.run([sys.executable, __file__, "--cell", f"{rows},{step},{resident_x}", "--root", str(root), "--iterations",
                          str(iterations), "--warmup", str(warmup)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=None, help="a commit whose engine is measured beside this tree's")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs per cell (the median is reported)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--resident-x", type=float, default=1.0, help="jobs resident as a multiple of a call's rows")
    p.add_argument("--trace", action="store_true", help="the engine along the scheduling simulator's 1.5x trace instead")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell is not None:
        rows, step, x = args.cell.split(",")
        if rows == "trace":
            print(measure_trace(Path(args.root), float(x)))
            return
        print(measure(Path(args.root), int(rows), step, args.iterations, args.warmup, float(x)))
        return
    sys.path.insert(0, str(ROOT))
    from ddpm.precision import cpu_capability

    worktree = None
    if args.baseline is not None:
        worktree = Path(tempfile.mkdtemp(prefix="ddpm-baseline-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline], check=True,
                       capture_output=True)  # fmt: skip
    print(f"CPU: {cpu_capability()}; 1 torch thread; {args.iterations} iterations after {args.warmup}", file=sys.stderr)
    try:
        rows_out = []
        for rows, step in [("trace", "sim")] if args.trace else CELLS:
            ours, theirs = [], []
            for _ in range(args.rounds):
                iterations = args.iterations if step == "null" else max(100, args.iterations // 8)  # the real step costs ms
                x = 1.5 if rows == "trace" else args.resident_x  # the trace's load
                ours.append(run_cell(ROOT, rows, step, iterations, args.warmup, x))
                if worktree is not None:
                    theirs.append(run_cell(worktree, rows, step, iterations, args.warmup, x))
            cell = {"rows": rows, "resident_x": args.resident_x, "unet": "null", "step": step,
                    "us_per_iteration": round(statistics.median(ours), 1)}  # fmt: skip
            if theirs:
                cell.update(baseline=args.baseline, baseline_us_per_iteration=round(statistics.median(theirs), 1),
                            ratio=round(statistics.median(ours) / statistics.median(theirs), 3))  # fmt: skip
            rows_out.append(cell)
            if args.json:
                print(json.dumps(cell), flush=True)
        if not args.json:
            print("| rows | step | µs/iteration | per row |" + (f" {args.baseline} µs/iteration | ratio |" if worktree else ""))
            print("|---|---|---|---|" + ("---|---|" if worktree else ""))
            for c in rows_out:
                extra = f" {c['baseline_us_per_iteration']} | {c['ratio']} |" if worktree else ""
                per_row = f"{c['us_per_iteration'] / c['rows']:.1f}" if isinstance(c["rows"], int) else "-"
                print(f"| {c['rows']} | {c['step']} | {c['us_per_iteration']} | {per_row} |{extra}")
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)


if __name__ == "__main__":
    main()
