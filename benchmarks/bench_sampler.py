"""Our offline sampler vs a loop over diffusers' DDPMScheduler.step (what DDPMPipeline does).

    python benchmarks/bench_sampler.py --steps 50 --batches 1,16,64

Both use the same eps model (the shipped U-Net), the same T, the same respaced timesteps and batch.
Rounds alternate between the two; the report is images/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddpm.cli import DEFAULT_MODEL
from ddpm.model_source import load_model_source
from ddpm.respace import respace_steps
from ddpm.sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor


def ours(model, steps: int, batch: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    seeds = seeds_to_tensor(image_seeds(0, batch))
    return sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps,
                  variance_type=model.variance_type, clip_denoised=model.clip_denoised)  # fmt: skip


def diffusers_loop(model, scheduler, steps: int, batch: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    chain = respace_steps(model.schedule, steps)
    scheduler.set_timesteps(timesteps=[int(t) for t in chain.timesteps[::-1]])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *model.image_shape), generator=gen)
    for t in scheduler.timesteps:
        eps = model.eps_model(x, t.repeat(batch))
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load_model_source(args.model)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=model.schedule.num_timesteps, beta_schedule="linear", variance_type=model.variance_type.value,
        clip_sample=model.clip_denoised,
    )  # fmt: skip
    print(f"steps={args.steps}, threads={torch.get_num_threads()}")
    print("| batch | ours img/s | diffusers img/s | ours / diffusers |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            times: dict[str, list[float]] = {"ours": [], "diffusers": []}
            for _ in range(args.rounds):
                for name, fn in [("ours", lambda: ours(model, args.steps, batch)),
                                 ("diffusers", lambda: diffusers_loop(model, scheduler, args.steps, batch))]:  # fmt: skip
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            o, d = (batch / statistics.median(times[k]) for k in ("ours", "diffusers"))
            print(f"| {batch} | {o:.2f} | {d:.2f} | {o / d:.2f} |")


if __name__ == "__main__":
    main()
