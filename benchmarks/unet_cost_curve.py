"""The U-Net's cost curve on this machine: ms and rows/s of one call per batch size, and one full batch run
as calls of fewer rows (what ``service/engine/call_size.py`` learns to do where that is faster).

    python benchmarks/unet_cost_curve.py                                  # compiled (auto), the server's precision
    python benchmarks/unet_cost_curve.py --compile off --sizes 1,8,64 --rounds 10

The shipped model on the server's hot path (``ddpm.inference_compile.hot_path``, 1 torch thread as the
benchmarks serve), the U-Net alone (no step), the sizes interleaved in each round so that drift of the
machine hits all alike; per size the median over ``--rounds`` of 5 calls. ``--split`` runs max-size rows as
calls of the given size (e.g. 32: two calls of 32 for 64 rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", default="auto", choices=["off", "auto"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--sizes", default="1,8,16,24,32,48,64")
    p.add_argument("--split", type=int, default=32, help="the largest size's rows as calls of this many (0: none)")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    import torch

    from ddpm.inference_compile import hot_path
    from ddpm.model_source import load_model_source
    from ddpm.precision import cpu_capability
    from ddpm.shipped_models import DEFAULT_MODEL

    torch.set_num_threads(1)
    model = load_model_source(str(DEFAULT_MODEL))
    fast = hot_path(model.eps_model, model.module, "cpu", args.compile, precision=args.precision)
    sizes = [int(s) for s in args.sizes.split(",")]
    full = max(sizes)
    cells: dict[str, tuple[int, list[int]]] = {str(s): (s, [s]) for s in sizes}
    if args.split:
        cells[f"{full} as {args.split}s"] = (full, [args.split] * (full // args.split) + ([full % args.split] if full % args.split else []))
    times: dict[str, list[float]] = {name: [] for name in cells}
    with torch.inference_mode():
        rows_needed = {s for _, calls in cells.values() for s in calls}
        inputs = {s: (torch.randn(s, *model.image_shape), torch.full((s,), 500, dtype=torch.long)) for s in rows_needed}
        for x, t in inputs.values():  # warm-up (and compiling)
            for _ in range(3):
                fast.eps_model(x, t)
        for _ in range(args.rounds):
            for name, (_, calls) in cells.items():
                start = time.perf_counter()
                for _ in range(5):
                    for s in calls:
                        fast.eps_model(*inputs[s])
                times[name].append((time.perf_counter() - start) / 5)
    print(f"CPU: {cpu_capability()}; compiled: {fast.compiled}; precision: {fast.precision}; 1 thread")
    print("| rows | ms per call | rows/s | spread ms |")
    print("|---|---|---|---|")
    for name, (rows, _) in cells.items():
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.1f} | {rows / ms * 1e3:.0f} | {min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
