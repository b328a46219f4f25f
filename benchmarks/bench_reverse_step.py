"""The fused reverse step against the unfused eager step (and diffusers' DDPMScheduler.step).

    python benchmarks/bench_reverse_step.py            # CPU: the PyTorch twin vs eager, per element
    python benchmarks/bench_reverse_step.py --gpu      # CUDA: Triton kernel bandwidth vs copy, vs eager, vs diffusers
    TRITON_INTERPRET=1 python benchmarks/bench_reverse_step.py --gpu --dry-run   # the --gpu code on CPU, tiny sizes

All variants of one row are timed side by side in the same run, alternating, and reported as ratios;
absolute times on these machines drift.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ddpm.chain import ChainTables, StepCoefficients
from ddpm.schedule import VarianceType, make_schedule
from kernels.philox import seeds_to_tensor
from kernels.reverse_step import fused_reverse_step_torch, fused_reverse_step_triton


def eager_step(x: torch.Tensor, eps: torch.Tensor, coefs: StepCoefficients) -> torch.Tensor:
    """What a plain PyTorch loop does: randn_like, then the Eq. 11 elementwise ops one by one."""
    z = torch.randn_like(x)
    b = (-1, 1, 1, 1)
    return coefs.x.view(b) * x + coefs.eps.view(b) * eps + coefs.sigma.view(b) * z  # Eq. 11 (unclipped table)


def timed(fn: Callable[[], object], sync: Callable[[], None], reps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def compare(fns: dict[str, Callable[[], object]], sync: Callable[[], None], rounds: int = 5, reps: int = 10) -> dict[str, float]:
    """Median seconds per call, variants interleaved round by round."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timed(fn, sync, reps))
    return {k: statistics.median(v) for k, v in samples.items()}


def inputs(b: int, c: int, hw: int, device: str, dtype: torch.dtype) -> tuple:  # type: ignore[type-arg]
    tables = ChainTables(make_schedule(), VarianceType.FIXED_SMALL, device, clip=False)
    pos = torch.randint(1, 1000, (b,), device=device)
    x = torch.randn(b, c, hw, hw, device=device, dtype=dtype)
    eps = torch.randn_like(x)
    seeds = seeds_to_tensor(list(range(b)), device)
    return x, eps, tables.coefficients(pos), seeds, pos + 1


def cpu(args: argparse.Namespace) -> None:
    print("| batch | shape | twin ms | eager ms | twin / eager | twin ns/elem |")
    print("|---|---|---|---|---|---|")
    for b, c, hw in [(1, 1, 28), (16, 1, 28), (64, 1, 28), (256, 1, 28), (16, 3, 32), (64, 3, 32), (2, 3, 256)]:
        x, eps, coefs, seeds, counter = inputs(b, c, hw, "cpu", torch.float32)
        t = compare(
            {"twin": lambda: fused_reverse_step_torch(x, eps, coefs, seeds, counter), "eager": lambda: eager_step(x, eps, coefs)},
            lambda: None,
            rounds=args.rounds,
        )
        ratio, per_elem = t["twin"] / t["eager"], t["twin"] / x.numel() * 1e9
        print(f"| {b} | {c}x{hw}x{hw} | {t['twin'] * 1e3:.3f} | {t['eager'] * 1e3:.3f} | {ratio:.1f} | {per_elem:.1f} |")


def gpu(args: argparse.Namespace) -> None:
    import diffusers
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    device = "cpu" if args.dry_run else "cuda"
    sync = (lambda: None) if args.dry_run else torch.cuda.synchronize
    if args.dry_run:
        dtypes, sizes, batches, reps = [torch.float32], [8], [1, 2], 2
    else:
        dtypes, sizes, batches, reps = [torch.float32, torch.bfloat16], [32, 256], [1, 4, 16, 64, 256], 50
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    print(
        "| dtype | batch | shape | fused us | GB/s | copy GB/s | % of copy | multistep us | multistep GB/s "
        "| eager us | eager / fused | diffusers us | diffusers / fused |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for hw in sizes:
            for b in batches:
                x, eps, coefs, seeds, counter = inputs(b, 3, hw, device, dtype)
                x0_prev = torch.randn_like(x, dtype=torch.float32)  # DPM-Solver++(2M) state: read it, write x0_hat too
                src = torch.empty(3 * x.numel(), device=device, dtype=dtype)  # the bytes the fused step moves
                dst = torch.empty_like(src)
                z = torch.randn_like(x)
                ddpm_module.randn_tensor = lambda *a, **k: z  # diffusers draws noise with randn; time its math only
                t = compare(
                    {
                        "fused": lambda: fused_reverse_step_triton(x, eps, coefs, seeds, counter),
                        "multistep": lambda: fused_reverse_step_triton(x, eps, coefs, seeds, counter, x0_prev),
                        "copy": lambda: dst.copy_(src),
                        "eager": lambda: eager_step(x, eps, coefs),
                        "diffusers": lambda: scheduler.step(eps, 500, x).prev_sample,
                    },
                    sync,
                    rounds=args.rounds,
                    reps=reps,
                )
                moved = 3 * x.numel() * x.element_size()  # read x, read eps, write x_prev
                gbs = moved / t["fused"] / 1e9
                copy_gbs = 2 * src.numel() * src.element_size() / t["copy"] / 1e9  # a copy reads and writes every byte
                multi_gbs = (moved + 2 * x.numel() * 4) / t["multistep"] / 1e9  # + read x0_prev, write x0_hat (fp32)
                print(
                    f"| {str(dtype).removeprefix('torch.')} | {b} | 3x{hw}x{hw} | {t['fused'] * 1e6:.1f} | {gbs:.0f} | {copy_gbs:.0f} | "
                    f"{100 * gbs / copy_gbs:.0f}% | {t['multistep'] * 1e6:.1f} | {multi_gbs:.0f} | "
                    f"{t['eager'] * 1e6:.1f} | {t['eager'] / t['fused']:.1f} | "
                    f"{t['diffusers'] * 1e6:.1f} | {t['diffusers'] / t['fused']:.1f} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: run its code on CPU tensors (TRITON_INTERPRET=1), tiny sizes")
    args = parser.parse_args()
    if args.gpu:
        if not args.dry_run and not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA")
        gpu(args)
    else:
        cpu(args)


if __name__ == "__main__":
    main()
