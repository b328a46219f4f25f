"""Everything issue 6 wants measured on a GPU, in one short run (~5 minutes on an H200).

    bash benchmarks/gpu/run.sh OUT_DIR   # on the GPU machine: this suite is one phase of the GPU check
    python benchmarks/gpu_suite.py > gpu.md
    python benchmarks/gpu_suite.py --device cpu --steps 2 --batches 1,2 --drift-batch 2 --drift-steps 3 \
        --compile-backend aot_eager   # dry run

1. Sampler images/s, ours vs a diffusers DDPMScheduler.step loop, same U-Net weights, 50 steps,
   batch 1/16/64/256: ours eager fp32, ours compiled fp32 without CUDA graphs, ours compiled fp32 (the
   server's default hot path on CUDA: compiled U-Net replayed as CUDA graphs + the fused Triton step),
   ours compiled (with graphs) under bf16 and fp16 autocast.
2. CUDA-graph gain per batch bucket: the U-Net call under torch.compile(mode="reduce-overhead")
   (CUDA graphs) vs torch.compile's default mode.
3. Low-precision drift: the same seeds through the whole 1000-step chain in fp32 and in bf16/fp16
   autocast; max and mean |difference| in [0, 1] pixel units and the share of 8-bit pixels that change.
The fused kernel's own bandwidth is `python benchmarks/bench_reverse_step.py --gpu`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_sampler import diffusers_loop
from ddpm.chain import EpsModel
from ddpm.inference_compile import hot_path
from ddpm.loaded_model import LoadedModel
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.precision import pixel_drift, with_precision
from ddpm.seeding import image_seeds
from ddpm.shipped_models import DEFAULT_MODEL
from kernels.philox import seeds_to_tensor

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn: Callable[[], object], rounds: int = 3) -> float:
    samples = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def chain(model: LoadedModel, eps_model: EpsModel, batch: int, steps: int) -> torch.Tensor:
    seeds = seeds_to_tensor(image_seeds(0, batch), DEVICE)
    return sample(eps_model, model.schedule, seeds, model.image_shape, steps=steps, variance_type=model.variance_type,
                  clip_denoised=model.clip_denoised, device=DEVICE)  # fmt: skip


def sampler_table(model_dir: str, steps: int, batches: list[int]) -> None:
    import diffusers

    eager = load_model_source(model_dir, DEVICE)
    compiled_model = load_model_source(model_dir, DEVICE)
    compiled = hot_path(compiled_model.eps_model, compiled_model.module, DEVICE, "on").eps_model  # CUDA graphs: the default
    no_graphs_model = load_model_source(model_dir, DEVICE)
    no_graphs = hot_path(no_graphs_model.eps_model, no_graphs_model.module, DEVICE, "on", cuda_graphs=False).eps_model
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=eager.schedule.num_timesteps, variance_type=eager.variance_type.value,
                                        clip_sample=eager.clip_denoised)  # fmt: skip
    variants: dict[str, Callable[[int], object]] = {
        "diffusers": lambda b: diffusers_loop(eager, scheduler, steps, b, device=DEVICE),
        "ours eager fp32": lambda b: chain(eager, eager.eps_model, b, steps),
        "ours compiled fp32, no graphs": lambda b: chain(no_graphs_model, no_graphs, b, steps),
        "ours compiled fp32": lambda b: chain(compiled_model, compiled, b, steps),
        "ours compiled bf16": lambda b: chain(compiled_model, with_precision(compiled, "bf16", DEVICE), b, steps),
        "ours compiled fp16": lambda b: chain(compiled_model, with_precision(compiled, "fp16", DEVICE), b, steps),
    }
    print(f"\n## Sampler, {steps} steps, images/s (ratio to diffusers)\n")
    print("| batch | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    with torch.inference_mode():
        for b in batches:
            for fn in variants.values():
                fn(b)  # compile / warm up
            rate = {name: b / cuda_time(lambda fn=fn: fn(b)) for name, fn in variants.items()}
            cells = [f"{r:.0f} ({r / rate['diffusers']:.2f}x)" for r in rate.values()]
            print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


def cuda_graph_table(model_dir: str, batches: list[int]) -> None:
    model = load_model_source(model_dir, DEVICE)
    module = model.module.to(memory_format=torch.channels_last)
    default = torch.compile(module)
    graphs = torch.compile(module, mode="reduce-overhead")
    print("\n## U-Net call: CUDA graphs (reduce-overhead) vs torch.compile default, ms per call\n")
    print("| batch | default ms | cuda graphs ms | gain |\n|---|---|---|---|")
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, *model.image_shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, 1000, (b,), device=DEVICE)
            ms = {}
            for name, fn in (("default", default), ("graphs", graphs)):
                for _ in range(3):
                    fn(x, t)
                ms[name] = 1e3 * cuda_time(lambda fn=fn: [fn(x, t) for _ in range(20)]) / 20
            print(f"| {b} | {ms['default']:.3f} | {ms['graphs']:.3f} | {ms['default'] / ms['graphs']:.2f}x |", flush=True)


def drift_table(model_dir: str, batch: int, steps: int | None) -> None:
    model = load_model_source(model_dir, DEVICE)
    steps = steps or model.schedule.num_timesteps
    print(f"\n## Low-precision drift, {steps}-step chain, {batch} images, vs fp32\n")
    print("| dtype | max abs | mean abs | 8-bit pixels changed |\n|---|---|---|---|")
    with torch.inference_mode():
        ref = chain(model, model.eps_model, batch, steps)
        for name in ("bf16", "fp16"):
            d = pixel_drift(chain(model, with_precision(model.eps_model, name, DEVICE), batch, steps), ref)
            print(f"| {name} | {d['max_abs']:.4f} | {d['mean_abs']:.5f} | {d['share_8bit_changed']:.2%} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--drift-batch", type=int, default=64)
    parser.add_argument("--drift-steps", type=int, default=None, help="default: the full chain (T)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    parser.add_argument("--parts", default="sampler,graphs,drift", help="which tables (the GPU check runs each under its own time limit)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="dry run: aot_eager traces every compiled column through dynamo and AOTAutograd as on the "
                        "GPU, without inductor's C++ build for the CPU (the GPU never runs it; ~4x less time; "
                        "tests/test_inference_compile.py covers it)")  # fmt: skip
    args = parser.parse_args()
    if args.compile_backend != "inductor":  # every torch.compile below and in ddpm.inference_compile (read at call time)
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)  # type: ignore[assignment]
    parts = set(args.parts.split(","))
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a GPU machine (--device cpu for a dry run)")
    batches = [int(b) for b in args.batches.split(",")]
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"# GPU suite: {name}, torch {torch.__version__}")
    if "sampler" in parts:
        sampler_table(args.model, args.steps, batches)
    if "graphs" in parts:
        cuda_graph_table(args.model, batches)
    if "drift" in parts:
        drift_table(args.model, args.drift_batch, args.drift_steps)


if __name__ == "__main__":
    main()
