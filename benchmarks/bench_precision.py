"""The U-Net in bf16 against fp32 on this CPU: speed side by side, and quality and drift on the same seeds.

    python benchmarks/bench_precision.py speed --batches 1,16,64           # eager and compiled, fp32 vs bf16
    python benchmarks/bench_precision.py quality -n 200 --steps 1000       # ddpm eval's figures for both, paired drift
    python benchmarks/bench_precision.py batch-independence --steps 50     # the contract's bound under bf16

Every figure is printed beside this CPU's name and low-precision flags: the same command gives
different answers on an AVX2-only machine (bf16 emulated, far slower) and on one with AVX-512 BF16
or AMX (native). Only the U-Net runs in bf16 (ddpm/precision.py); x_t and the fused step stay fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.inference_compile import hot_path
from ddpm.loaded_model import LoadedModel
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.precision import cpu_capability, native_bf16, pixel_drift
from ddpm.seeding import image_seeds
from ddpm.shipped_models import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from kernels.philox import seeds_to_tensor


def chain(model: LoadedModel, precision: str, compile_setting: str, seeds: torch.Tensor, steps: int) -> torch.Tensor:
    fast = hot_path(model.eps_model, model.module, "cpu", compile_setting, precision=precision)
    with torch.inference_mode():
        return sample(fast.eps_model, model.schedule, seeds, model.image_shape, steps=steps, variance_type=model.variance_type,
                      clip_denoised=model.clip_denoised, step_fn=fast.step_fn)  # fmt: skip


def speed(args: argparse.Namespace) -> dict[str, object]:
    """ms per U-Net call, fp32 vs bf16, eager and compiled, alternating rounds."""
    model = load_model_source(args.model, "cpu")
    rows = []
    paths = {
        (p, c): hot_path(model.eps_model, model.module, "cpu", c, precision=p).eps_model for p in ("fp32", "bf16") for c in ("off", "on")
    }
    print(f"\n## U-Net call, ms (CPU: {cpu_capability()}; threads {torch.get_num_threads()})\n")
    print("| batch | fp32 eager | bf16 eager | eager fp32/bf16 | fp32 compiled | bf16 compiled | compiled fp32/bf16 |", end="")
    print(" bf16 compiled vs fp32 eager |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for b in args.batches:
            x = torch.randn(b, *model.image_shape)
            t = torch.randint(0, model.schedule.num_timesteps, (b,))
            for fn in paths.values():
                fn(x, t), fn(x, t)  # compile / warm up
            samples: dict[tuple[str, str], list[float]] = {k: [] for k in paths}
            for _ in range(args.rounds):
                for key, fn in paths.items():
                    start = time.perf_counter()
                    for _ in range(args.reps):
                        fn(x, t)
                    samples[key].append((time.perf_counter() - start) / args.reps * 1e3)
            ms = {k: statistics.median(v) for k, v in samples.items()}
            row = {"batch": b, **{f"{p}_{'compiled' if c == 'on' else 'eager'}_ms": round(v, 3) for (p, c), v in ms.items()}}
            rows.append(row)
            print(f"| {b} | {ms['fp32', 'off']:.2f} | {ms['bf16', 'off']:.2f} | {ms['fp32', 'off'] / ms['bf16', 'off']:.2f}x | "
                  f"{ms['fp32', 'on']:.2f} | {ms['bf16', 'on']:.2f} | {ms['fp32', 'on'] / ms['bf16', 'on']:.2f}x | "
                  f"{ms['fp32', 'off'] / ms['bf16', 'on']:.2f}x |", flush=True)  # fmt: skip
    return {"cpu": cpu_capability(), "native_bf16": native_bf16("cpu"), "threads": torch.get_num_threads(), "rows": rows}


def quality(args: argparse.Namespace) -> dict[str, object]:
    """ddpm eval's figures for fp32 and bf16 on the same seeds, the paired drift, and the noise scale."""
    from ddpm.classifier import load_classifier
    from ddpm.evaluate import classify, evaluate, frechet_distance, real_reference

    classifier = load_classifier(args.classifier)
    model = load_model_source(args.model, "cpu")
    out: dict[str, object] = {"cpu": cpu_capability(), "n": args.n, "steps": args.steps, "seed": args.seed}
    images = {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        parts = []
        for first in range(0, args.n, args.batch_size):
            seeds = seeds_to_tensor(image_seeds(args.seed, min(args.batch_size, args.n - first), first=first))
            parts.append(chain(model, precision, args.compile, seeds, args.steps))
        images[precision] = torch.cat(parts)
        out[precision] = {"seconds": round(time.perf_counter() - start, 1), **evaluate(classifier, images[precision])}
        print(f"{precision}: {json.dumps(out[precision]['samples'])} in {out[precision]['seconds']} s", flush=True)  # type: ignore[index]
    out["drift"] = pixel_drift(images["bf16"], images["fp32"])
    _, p32 = classify(classifier, images["fp32"])
    _, p16 = classify(classifier, images["bf16"])
    out["class_agreement"] = float((p32.argmax(1) == p16.argmax(1)).mean())
    # the evaluation's own noise at this N: real-vs-real FD over 10 different reference splits
    spread = []
    for s in range(10):
        a, b = real_reference(args.n, seed=100 + s)
        (fa, _), (fb, _) = classify(classifier, a), classify(classifier, b)
        spread.append(frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False)))
    out["real_vs_real_fd_over_10_splits"] = {"mean": statistics.mean(spread), "std": statistics.stdev(spread)}
    p = (out["fp32"]["samples"]["confident_share"] + out["bf16"]["samples"]["confident_share"]) / 2  # type: ignore[index]
    out["confident_share_se"] = (p * (1 - p) / args.n) ** 0.5
    print(json.dumps(out, indent=2))
    return out


def batch_independence(args: argparse.Namespace) -> dict[str, object]:
    """Image k alone and inside a batch of 16, both in bf16 (and in fp32 for scale)."""
    model = load_model_source(args.model, "cpu")
    result = {}
    for precision in ("fp32", "bf16"):
        alone = chain(model, precision, "off", seeds_to_tensor(image_seeds(args.seed, 1)), args.steps)
        batch = chain(model, precision, "off", seeds_to_tensor(image_seeds(args.seed, 16)), args.steps)
        result[precision] = pixel_drift(alone[0:1], batch[0:1])
    print(json.dumps({"cpu": cpu_capability(), "steps": args.steps, **result}, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "quality", "batch-independence"])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    parser.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"speed": speed, "quality": quality, "batch-independence": batch_independence}[args.mode](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
