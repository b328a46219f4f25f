"""The cost of classifier-free guidance: a guided image-step is two U-Net rows (its label and the null
label) in the same call, so a guided image should cost ~2x an unguided one; and the guidance
combination itself, (1 + w) eps_y - w eps_null, next to the U-Net call it follows.

    python benchmarks/bench_guidance.py --model training/mnist-28-cond/model --batch 32 --steps 20

Offline sampler (ddpm.chain, the server's hot path per --compile/--precision), same seeds and chain
for each variant, variants alternating over rounds; images/s is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.chain import ChainSpec
from ddpm.guidance import fixed_guidance, guided_eps
from ddpm.inference_compile import hot_path
from ddpm.model_source import load_model_source
from ddpm.names import COMPILE_SETTINGS
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a class-conditional model directory")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--steps", type=int, default=20, help="U-Net calls per image")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    parser.add_argument("--compile", default="off", choices=COMPILE_SETTINGS, help="the hot path")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"], help="the U-Net's precision")
    args = parser.parse_args()
    model = load_model_source(args.model)
    assert model.conditional, f"{args.model} is not class-conditional"
    fast = hot_path(model.eps_model, model.module, "cpu", args.compile, precision=args.precision)
    b, null = args.batch, model.num_classes
    labels = torch.arange(b) % model.num_classes
    variants = {
        "unconditional (null label)": fast.eps_model,
        "conditional, w = 0": fixed_guidance(fast.eps_model, labels, torch.zeros(b), null),
        "guided, w = 2": fixed_guidance(fast.eps_model, labels, torch.full((b,), 2.0), null),
        "half guided (w = 2 / 0)": fixed_guidance(fast.eps_model, labels, (torch.arange(b) % 2 * 2.0), null),
    }
    seeds = seeds_to_tensor(image_seeds(0, b))
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for rnd in range(args.rounds + 1):  # round 0 warms up (and compiles)
            for name, eps in variants.items():
                start = time.perf_counter()
                sample(eps, model.schedule, seeds, model.image_shape, steps=args.steps, sampler="sde-dpmsolver++",
                       variance_type=model.variance_type, clip_denoised=model.clip_denoised, step_fn=fast.step_fn)  # fmt: skip
                if rnd:
                    times[name].append(time.perf_counter() - start)
        # the combination alone vs the U-Net call it follows (one iteration of a fully guided batch)
        x, t = torch.randn(b, *model.image_shape), torch.full((b,), 500)
        eps_y, eps_null, w = torch.randn(b, *model.image_shape), torch.randn(b, *model.image_shape), torch.full((b,), 2.0)
        guided = torch.arange(b)
        combine, unet = [], []
        for _ in range(50):
            start = time.perf_counter()
            wv = w.view(-1, 1, 1, 1)
            eps_y.index_copy(0, guided, (1 + wv) * eps_y[guided] - wv * eps_null)
            combine.append(time.perf_counter() - start)
        for _ in range(5):
            start = time.perf_counter()
            guided_eps(fast.eps_model, x, t, labels, w, null)
            unet.append(time.perf_counter() - start)
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, torch threads {torch.get_num_threads()}, compile={args.compile}, precision {fast.precision}; "
          f"batch {b}, {args.steps}-step sde-dpmsolver++, median of {args.rounds} rounds")  # fmt: skip
    print("| variant | U-Net rows per image-step | images/s | cost per image vs conditional |\n|---|---|---|---|")
    base = b / statistics.median(times["conditional, w = 0"])
    rows = {"unconditional (null label)": 1, "conditional, w = 0": 1, "guided, w = 2": 2, "half guided (w = 2 / 0)": 1.5}
    for name, ts in times.items():
        rate = b / statistics.median(ts)
        print(f"| {name} | {rows[name]} | {rate:.2f} | {base / rate:.2f}x |")
    c, u = statistics.median(combine), statistics.median(unet)
    print(f"guidance combination: {c * 1e6:.0f} us per iteration of {b} guided samples, {c / u:.2%} of that iteration's U-Net call "
          f"({u * 1e3:.1f} ms for {2 * b} rows)")  # fmt: skip
    mixed_engine(model, fast, args)


def mixed_engine(model, fast, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """The engine (the server's batcher, no HTTP) on a mix of one-image requests, a third each guided (w = 2),
    conditional (w = 0) and unconditional, all submitted at once, against the offline sampler running the
    same images as three batches (one per kind): images/s of each, same chain, the two alternating over
    ``args.rounds`` rounds (this machine's speed drifts by 20% between runs of a few seconds)."""
    import functools

    from ddpm.image_request import ImageRequest
    from kernels.reverse_step import fused_reverse_step
    from service.engine.engine import Engine
    from service.engine.job import Job

    b, null = args.batch, model.num_classes
    kinds = [((7,), 2.0), ((3,), 0.0), (None, 0.0)]
    step_fn = fast.step_fn or functools.partial(fused_reverse_step, backend=fast.step_backend)
    model.eps_model = fast.eps_model
    engine = Engine(model, max_batch=b, max_queue=10_000, step_fn=step_fn)
    engine.warmup(2)
    engine.start()
    spacing = "trailing"

    def served() -> float:
        start = time.perf_counter()
        chain = ChainSpec(args.steps, "sde-dpmsolver++", spacing=spacing)
        jobs = [engine.submit(Job(ImageRequest(i, 1, chain, *kinds[i % 3]), timeout_s=3600)) for i in range(3 * b)]
        while not all(j.done for j in jobs):
            time.sleep(0.005)
        return len(jobs) / (time.perf_counter() - start)

    def offline() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for labels, w in kinds:
                y = torch.full((b,), labels[0] if labels else null)
                eps = fixed_guidance(fast.eps_model, y, torch.full((b,), w), null)
                sample(eps, model.schedule, seeds_to_tensor(image_seeds(0, b)), model.image_shape, steps=args.steps,
                       sampler="sde-dpmsolver++", spacing=spacing, variance_type=model.variance_type,
                       clip_denoised=model.clip_denoised, step_fn=fast.step_fn)  # fmt: skip
        return 3 * b / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"engine": [], "offline": []}
    try:
        for rnd in range(args.rounds):
            first, second = (served, offline) if rnd % 2 == 0 else (offline, served)  # neither always goes first
            for fn in (first, second):
                rates["engine" if fn is served else "offline"].append(fn())
    finally:
        engine.stop()
    ratios = [e / o for e, o in zip(rates["engine"], rates["offline"], strict=True)]
    print(f"mixed requests ({3 * b} one-image {args.steps}-step requests, 1/3 guided), median of {args.rounds} alternating rounds: "
          f"engine {statistics.median(rates['engine']):.2f} images/s (max batch {b}), offline sampler as three batches of {b} "
          f"{statistics.median(rates['offline']):.2f} images/s; served / offline per round "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
