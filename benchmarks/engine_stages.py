"""Where an iteration's time goes on the serving path: the engine's stages timed one by one, with the shipped
U-Net and the step as the server runs them (compiled where it compiles, bf16 where the CPU has it).

    python benchmarks/engine_stages.py                     # 1 and 6 rows of the default chain (interactive-like)
    python benchmarks/engine_stages.py --rows 1,6,24 --rounds 3 --iterations 200

``Engine`` without HTTP, 1 torch thread, ``rows`` rows kept resident by a closed loop of 1-image requests of
the server's default chain (restart, 10 calls; each finished one replaced between iterations), every row
advancing each iteration (no slowdown bound, call size = rows). Per iteration: admit (new rows joining),
schedule (the step scheduler), eps (the U-Net call), step (the fused step), advance (rows moved on, finished
ones read out), and the whole ``Engine._iterate``. Mean ms over ``--iterations``, per round; the sizes take
turns in each round. What is not the U-Net is the engine's host time per iteration, which the step
scheduler's short iterations (deadlines on a CPU) pay many times a second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("_admit", "_schedule", "_eps", "_step", "_advance")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,6")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--compile", default="auto", choices=["off", "auto"])
    args = p.parse_args()

    import torch

    from ddpm.chain import ChainSpec
    from ddpm.image_request import ImageRequest
    from ddpm.inference_compile import hot_path
    from ddpm.model_source import load_model_source
    from ddpm.precision import cpu_capability
    from ddpm.shipped_models import DEFAULT_MODEL
    from service.engine.engine import Engine
    from service.engine.job import Job
    from service.settings import Settings

    torch.set_num_threads(1)
    print(f"CPU: {cpu_capability()}", file=sys.stderr)
    model = load_model_source(str(DEFAULT_MODEL))
    fast = hot_path(model.eps_model, model.module, "cpu", args.compile, precision="auto")
    model.eps_model = fast.eps_model
    sizes = [int(x) for x in args.rows.split(",")]
    engines = {rows: Engine(model, max_batch=rows, max_resident=rows, step_fn=fast.step_fn, max_slowdown=0) for rows in sizes}
    server = Settings()
    chain = ChainSpec(server.default_steps, server.default_sampler, spacing=server.default_timestep_spacing)
    seeds = iter(range(10**9))
    flight: dict[int, list[Job]] = {rows: [] for rows in sizes}
    spent: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def run(*a: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - start)

        return run

    def iterate(rows: int, iterations: int) -> None:
        engine = engines[rows]
        for _ in range(iterations):
            flight[rows] = [job for job in flight[rows] if not job.done]
            while len(flight[rows]) < rows + 1:  # one more than resident: a newcomer joins as a row leaves
                flight[rows].append(engine.submit(Job(ImageRequest(next(seeds), 1, chain), timeout_s=3600)))
            timed("iteration", engine._iterate)()

    with torch.inference_mode():
        for rows, engine in engines.items():
            engine.warmup(2)  # the compile (batch 1, 2 and max_batch), which a server does before it is ready
            iterate(rows, 30)
            for name in STAGES:
                setattr(engine, name, timed(name.lstrip("_"), getattr(engine, name)))
        results: dict[int, list[dict[str, float]]] = {rows: [] for rows in sizes}
        for r in range(args.rounds):
            for rows in sizes if r % 2 == 0 else sizes[::-1]:
                spent.clear()
                iterate(rows, args.iterations)
                cell = {name: round(statistics.mean(v) * 1e3, 3) for name, v in spent.items()}
                results[rows].append(cell)
                print(json.dumps({"rows": rows, "round": r, "ms": cell}), flush=True)
    print("\n| rows | admit | schedule | eps (U-Net) | step | advance | iteration | not the U-Net |")
    print("|---|---|---|---|---|---|---|---|")
    for rows, cells in results.items():
        med = {name: statistics.median(c[name] for c in cells) for name in cells[0]}
        print(f"| {rows} | " + " | ".join(f"{med[n.lstrip('_')]:.3f}" for n in STAGES) +
              f" | {med['iteration']:.3f} | {med['iteration'] - med['eps']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
