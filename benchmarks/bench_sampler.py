"""Our offline sampler vs a loop over diffusers' DDPMScheduler.step (what DDPMPipeline does), and the
roofline of the CPU path.

    python benchmarks/bench_sampler.py --steps 50 --batches 1,16,64

All variants use the same U-Net weights (the shipped model), the same T, the same respaced timesteps
and batch. Variants, alternating within each round:
- ours: the hot path ``ddpm sample`` and ``ddpm serve`` run by default (``--compile auto``: the
  compiled channels-last U-Net and the compiled Philox step on CPU; eager where no compiler exists);
- ours-eager: the same sampler with ``--compile off`` (eager U-Net, eager Philox twin);
- diffusers: ``DDPMScheduler.step`` in a loop around the eager U-Net.
Roofline: U-Net FLOPs (torch.utils.flop_counter) per second of ``ours``, against the fp32 matmul rate
measured in the same run at the same thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ddpm.chain import EpsModel, StepFn
from ddpm.inference_compile import hot_path
from ddpm.loaded_model import LoadedModel
from ddpm.model_source import load_model_source
from ddpm.names import COMPILE_SETTINGS
from ddpm.offline_sampler import sample
from ddpm.respace import respace_steps
from ddpm.seeding import image_seeds
from ddpm.shipped_models import DEFAULT_MODEL
from ddpm.unet import count_flops_per_image
from kernels.philox import seeds_to_tensor


def ours(model: LoadedModel, eps_model: EpsModel, step_fn: StepFn | None, steps: int, batch: int) -> torch.Tensor:
    seeds = seeds_to_tensor(image_seeds(0, batch))
    return sample(eps_model, model.schedule, seeds, model.image_shape, steps=steps, variance_type=model.variance_type,
                  clip_denoised=model.clip_denoised, step_fn=step_fn)  # fmt: skip


def diffusers_loop(model: LoadedModel, scheduler, steps: int, batch: int, device: str = "cpu") -> torch.Tensor:  # type: ignore[no-untyped-def]
    chain = respace_steps(model.schedule, steps)
    scheduler.set_timesteps(timesteps=[int(t) for t in chain.timesteps[::-1]], device=device)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn((batch, *model.image_shape), generator=gen, device=device)
    for t in scheduler.timesteps:
        eps = model.module(x, t.repeat(batch))
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """Best-of-reps fp32 matmul rate at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, default="auto", help="the hot path of 'ours'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model_source(args.model)
    gflop = count_flops_per_image(model.module, model.module.config) / 1e9
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=model.schedule.num_timesteps, beta_schedule="linear", variance_type=model.variance_type.value,
        clip_sample=model.clip_denoised,
    )  # fmt: skip
    eager = load_model_source(args.model)  # a separate module: compiling converts ours to channels-last
    fast = hot_path(model.eps_model, model.module, "cpu", args.compile)
    variants: dict[str, Callable[[int], object]] = {
        "ours": lambda b: ours(model, fast.eps_model, fast.step_fn, args.steps, b),
        "ours-eager": lambda b: ours(eager, eager.eps_model, None, args.steps, b),
        "diffusers": lambda b: diffusers_loop(eager, scheduler, args.steps, b),
    }
    peak = [matmul_gflops()]
    print(f"steps={args.steps}, threads={torch.get_num_threads()}, compile={args.compile}, U-Net {gflop:.3f} GFLOP/image-step")
    rows = []
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            warm = {name: _timed(lambda fn=fn: fn(batch)) for name, fn in variants.items()}  # compiles happen here
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    times[name].append(_timed(lambda fn=fn: fn(batch)))
            peak.append(matmul_gflops())
            rate = {name: batch / statistics.median(ts) for name, ts in times.items()}
            rows.append((batch, rate, warm["ours"]))
    matmul = statistics.median(peak)
    print(f"fp32 matmul (1024^3, best of 10, median over {len(peak)} checks): {matmul:.1f} GFLOP/s")
    print("| batch | ours img/s | ours-eager img/s | diffusers img/s | ours / diffusers | ours / eager | U-Net GFLOP/s (ours) "
          "| of matmul | first call s |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for batch, rate, first in rows:
        achieved = rate["ours"] * args.steps * gflop
        print(f"| {batch} | {rate['ours']:.2f} | {rate['ours-eager']:.2f} | {rate['diffusers']:.2f} | "
              f"{rate['ours'] / rate['diffusers']:.2f} | {rate['ours'] / rate['ours-eager']:.2f} | {achieved:.1f} | "
              f"{achieved / matmul:.0%} | {first:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
