"""What a model costs to serve on this machine: time per image-step (one U-Net call plus the fused step,
per image) at batch 1 and 16, and memory, for the shipped MNIST model beside a model of the published
google/ddpm-cifar10-32 shape (35.7M parameters, 32x32x3; random weights, since weights cannot be fetched
here: the cost of a call does not depend on the weights' values).

    python benchmarks/bench_model_cost.py                       # eager fp32 (the comparison in BENCHMARKS.md)
    python benchmarks/bench_model_cost.py --compile auto --precision auto   # the server's default hot path

Each model is measured in a fresh process (so its memory is its own), loaded by the server's loader
(ddpm.model_source, the CIFAR-shaped one from a hub-cache layout with HF_HUB_OFFLINE=1, as
``--model google/ddpm-cifar10-32`` would load it); the models alternate over rounds so that drift of
the machine hits both alike. Memory: resident set after loading minus before (weights and module),
and the peak resident set of the process over the whole run (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddpm.names import COMPILE_SETTINGS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(model_spec: str, batches: list[int], steps: int, rounds: int, compile_setting: str, precision: str) -> dict:
    """Runs in its own process: one model, every batch size, ``rounds`` timings each."""
    import torch

    from ddpm.inference_compile import hot_path
    from ddpm.model_facts import flops_per_image_step, parameter_count, weights_sha256
    from ddpm.model_source import load_model_source
    from ddpm.offline_sampler import sample
    from ddpm.seeding import image_seeds
    from kernels.philox import seeds_to_tensor

    before = _rss_kib("VmRSS")
    model = load_model_source(model_spec)
    loaded = _rss_kib("VmRSS")
    flops = flops_per_image_step(model.eps_model, model.image_shape, model.device)
    fast = hot_path(model.eps_model, model.module, "cpu", compile_setting, precision=precision)
    out = {"model": model.name, "parameters": parameter_count(model.module), "gflop_per_image_step": flops / 1e9,
           "weights_mb": sum(p.stat().st_size for p in model.path.rglob("*.safetensors")) / 2**20 if model.path else 0,
           "sha256": weights_sha256(model.path)[:12] if model.path else "", "load_rss_mb": (loaded - before) / 1024,
           "threads": torch.get_num_threads(), "precision": fast.precision, "compiled": fast.compiled, "per_image_step_ms": {}}  # fmt: skip
    with torch.inference_mode():
        for batch in batches:
            seeds = seeds_to_tensor(image_seeds(0, batch))

            def run(seeds: torch.Tensor = seeds) -> None:
                sample(fast.eps_model, model.schedule, seeds, model.image_shape, steps=steps, variance_type=model.variance_type,
                       clip_denoised=model.clip_denoised, step_fn=fast.step_fn)  # fmt: skip

            run()  # warm-up (and compilation)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            out["per_image_step_ms"][str(batch)] = statistics.median(times) / (steps * batch) * 1e3
    out["peak_rss_mb"] = _rss_kib("VmHWM") / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16", help="batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="U-Net calls per timing")
    parser.add_argument("--rounds", type=int, default=3, help="timings per batch size and model (median)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per model, alternating")
    parser.add_argument("--compile", default="off", choices=COMPILE_SETTINGS, help="the hot path (server default: auto)")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"], help="U-Net precision (server default: auto)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure this model in this process
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        print(json.dumps(measure(args.one, batches, args.steps, args.rounds, args.compile, args.precision)))
        return

    from ddpm.shipped_models import DEFAULT_MODEL
    from tests.published_ddpm import REPO_ID, lay_out_hub_cache, save_cifar10_shaped_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = save_cifar10_shaped_pipeline(Path(tmp) / "ddpm-cifar10-32")
        lay_out_hub_cache(Path(tmp) / "cache", REPO_ID, pipeline)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(Path(tmp) / "cache")}
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for spec in (str(DEFAULT_MODEL), REPO_ID):
                cmd = [sys.executable, __file__, "--one", spec, "--batches", args.batches, "--steps", str(args.steps),
                       "--rounds", str(args.rounds), "--compile", args.compile, "--precision", args.precision]  # fmt: skip
                line = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                r = json.loads(line)
                results.setdefault(r["model"], []).append(r)
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    first = next(iter(results.values()))[0]
    print(f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {first['threads']}, compile={args.compile}, "
          f"precision {first['precision']}; {args.steps} U-Net calls per timing, "
          f"median of {args.rounds} x {args.repeats} processes")  # fmt: skip
    head = " | ".join(f"ms per image-step, batch {b}" for b in batches)
    print(f"| model | parameters | GFLOP per image-step | weights MB | {head} | RSS after load MB | peak RSS MB |")
    print("|---" * (6 + len(batches)) + "|")
    per = {}
    for name, runs in results.items():
        ms = {b: statistics.median(r["per_image_step_ms"][str(b)] for r in runs) for b in batches}
        per[name] = ms
        r0 = runs[0]
        cells = " | ".join(f"{ms[b]:.2f}" for b in batches)
        load_mb, peak_mb = statistics.median(r["load_rss_mb"] for r in runs), statistics.median(r["peak_rss_mb"] for r in runs)
        print(f"| {name} | {r0['parameters']:,} | {r0['gflop_per_image_step']:.3f} | {r0['weights_mb']:.1f} | {cells} | "
              f"{load_mb:.0f} | {peak_mb:.0f} |")  # fmt: skip
    names = list(per)
    ratios = ", ".join(f"batch {b}: {per[names[1]][b] / per[names[0]][b]:.1f}x" for b in batches)
    print(f"{names[1]} / {names[0]} time per image-step: {ratios}")


if __name__ == "__main__":
    main()
