"""Capacity with the call size learned (``DDPM_TUNE_CALL_SIZE=true``, the default) and with every call up
to max batch (``false``), alternated over rounds (these machines drift: compare within a run).

    python benchmarks/call_size_ab.py --engine        # in one process: two engines, one compiled U-Net
    python benchmarks/call_size_ab.py --engine --guided   # the class-conditional model, every image guided (w 2)
    python benchmarks/call_size_ab.py                 # two servers per round, 2 rounds, compiled (auto)
    python benchmarks/call_size_ab.py --rounds 3 --compile off

``--engine``: the engine without HTTP, as the server builds its hot path (the shipped model, compiled,
1 torch thread), two ``Engine`` s sharing that U-Net (max batch 64, 256 rows resident), each kept at 96
images in flight of 16-image 50-call DDIM requests (a finished one replaced between iterations);
the learning one gets 400 iterations to learn its call size, then per round each runs 30 iterations,
timed, in turn: U-Net rows per second. The cleanest comparison (one process, the same graphs), without
what a server adds (HTTP threads, the PNG encoding).

Servers: per cell one ``ddpm serve`` as ``benchmarks/scheduling.py`` starts it (the shipped model, 1 torch thread,
max batch 64, ready once compiled), then its closed loop (6 clients of 16-image 50-call requests, 96
images in flight): 30 s to warm in (the call size is learned meanwhile), then capacity over 30 s in
U-Net row-calls per second from the server's own count, and the call size it reports
(``ddpm_call_size_rows``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduling import ROOT, capacity, start

from tests.prometheus_text import sample_value


def engines(rounds: int, compile_setting: str, guided: bool = False) -> None:
    """``guided``: the class-conditional model (models/mnist-28-cond), every image guided (w = 2: two U-Net rows);
    rates are then of samples, half the U-Net rows."""
    import statistics
    import time

    import torch

    from ddpm.chain import ChainSpec
    from ddpm.image_request import ImageRequest
    from ddpm.inference_compile import hot_path
    from ddpm.model_source import load_model_source
    from ddpm.shipped_models import DEFAULT_MODEL
    from service.engine.engine import Engine
    from service.engine.iteration_cost import IterationCost
    from service.engine.job import Job

    torch.set_num_threads(1)
    model = load_model_source(str(ROOT / "models" / "mnist-28-cond") if guided else str(DEFAULT_MODEL))
    fast = hot_path(model.eps_model, model.module, "cpu", compile_setting, precision="auto")
    model.eps_model = fast.eps_model
    pair = {tune: Engine(model, max_batch=64, max_resident=256, step_fn=fast.step_fn, tune_call_size=tune) for tune in (True, False)}
    chain, seeds = ChainSpec(50, "ddim", spacing="trailing"), iter(range(10**9))
    flight: dict[bool, list[Job]] = {tune: [] for tune in pair}

    def run(tune: bool, iterations: int) -> float:
        engine, rows = pair[tune], 0
        start = time.perf_counter()
        for _ in range(iterations):
            flight[tune] = [job for job in flight[tune] if not job.done]
            while len(flight[tune]) < 6:  # 96 images in flight
                seed = next(seeds)
                labels = (tuple((seed + k) % 10 for k in range(16)), 2.0) if guided else ()
                flight[tune].append(engine.submit(Job(ImageRequest(seed, 16, chain, *labels), timeout_s=3600)))  # type: ignore[arg-type]
            before = sum(job.steps_done for job in flight[tune])
            engine._iterate()
            rows += sum(job.steps_done for job in flight[tune]) - before
        return rows / (time.perf_counter() - start)

    rates: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for engine in pair.values():
            engine.warmup(2)  # batch 1, 2 and 64 (and the compile, which the server's serving engine never sees)
            engine.cost = IterationCost()  # what the warm-up measured included compiling
        run(False, 20)
        run(True, 400)  # learning its call size
        for r in range(rounds):
            for tune in (True, False) if r % 2 == 0 else (False, True):
                rates[tune].append(run(tune, 30))
    print(json.dumps({"learned_call_size": pair[True].call_size.best, "learned_rows_per_s": [round(x) for x in rates[True]],
                      "max_batch_rows_per_s": [round(x) for x in rates[False]]}))  # fmt: skip
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"median: learned ({pair[True].call_size.best} rows) {on:.0f} / max batch {off:.0f} rows/s = {on / off:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", default="auto", choices=["off", "auto"])
    p.add_argument("--engine", action="store_true", help="two engines in this process instead of two servers")
    p.add_argument("--guided", action="store_true", help="with --engine: the class-conditional model, every image guided")
    args = p.parse_args()
    from ddpm.precision import cpu_capability

    print(f"CPU: {cpu_capability()}", file=sys.stderr)
    if args.engine:
        engines(max(args.rounds, 6), args.compile, args.guided)
        return 0
    results: dict[str, list[float]] = {"true": [], "false": []}
    for r in range(args.rounds):
        for tune in ("true", "false") if r % 2 == 0 else ("false", "true"):
            os.environ["DDPM_TUNE_CALL_SIZE"] = tune  # the server process inherits it
            server = start("priorities", ROOT / "models" / "mnist-28", args.compile)
            try:
                cap = capacity(server.url, 30.0, warm_s=30.0)
                size = sample_value(httpx.get(server.url + "/metrics", timeout=10).text, "ddpm_call_size_rows")
            finally:
                server.stop()
            results[tune].append(cap)
            cell = {"round": r, "tune_call_size": tune, "capacity_row_calls_per_s": round(cap, 1), "call_size": size}
            print(json.dumps(cell), flush=True)
    for r, (on, off) in enumerate(zip(results["true"], results["false"], strict=True)):
        print(f"round {r}: learned {on:.1f} / max batch {off:.1f} row-calls/s = {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
