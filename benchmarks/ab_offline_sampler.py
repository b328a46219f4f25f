"""A/B of the offline sampler between two checkouts (a restructure must not slow ``ddpm sample``): the
shipped model, eager fp32 (or --compile on), a batch of 32 over one chain, timed in alternation, each
checkout in its own process with its own ``ddpm``, so that the machine's drift falls on both alike.

    python benchmarks/ab_offline_sampler.py --a /tmp/old-clone --b . --rounds 5

Prints images/s per round and the median ratio b / a. ``--worker`` is the timed child (internal).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    try:  # the new home of the offline sampler, else the old one
        from ddpm.offline_sampler import sample
    except ImportError:
        from ddpm.chain import sample  # type: ignore[no-redef]
    from ddpm.inference_compile import hot_path
    from ddpm.model_source import load_model_source
    from ddpm.seeding import image_seeds
    from ddpm.shipped_models import DEFAULT_MODEL
    from kernels.philox import seeds_to_tensor

    torch.set_num_threads(args.threads)
    model = load_model_source(str(DEFAULT_MODEL), "cpu")
    fast = hot_path(model.eps_model, model.module, "cpu", args.compile, precision="fp32")
    seeds = seeds_to_tensor(image_seeds(0, args.batch))
    kwargs = dict(steps=args.steps, variance_type=model.variance_type, sampler=args.sampler, spacing="trailing", step_fn=fast.step_fn)
    with torch.inference_mode():
        sample(fast.eps_model, model.schedule, seeds, model.image_shape, **kwargs)  # warm
        start = time.perf_counter()
        x = sample(fast.eps_model, model.schedule, seeds, model.image_shape, **kwargs)
        seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": args.batch / seconds, "checksum": float(x.double().sum())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", help="the baseline checkout (with its .venv)")
    p.add_argument("--b", default=".", help="the checkout under test (with its .venv)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", default="off")
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.a is None:
        p.error("--a (the baseline checkout) is required")
    flags = ["--batch", str(args.batch), "--steps", str(args.steps), "--sampler", args.sampler, "--threads", str(args.threads),
             "--compile", args.compile, "--worker"]  # fmt: skip
    rates: dict[str, list[float]] = {"a": [], "b": []}
    sums: dict[str, float] = {}
    for r in range(args.rounds):
        for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
            root = Path(getattr(args, name)).resolve()
            out = subprocess.run([str(root / ".venv/bin/python"), str(Path(__file__).resolve()), *flags], cwd=root, capture_output=True,
                                 text=True, check=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rates[name].append(row["images_per_s"])
            sums[name] = row["checksum"]
            print(f"round {r} {name}: {row['images_per_s']:.2f} images/s", flush=True)
    ratio = statistics.median(b / a for a, b in zip(rates["a"], rates["b"], strict=True))
    print(f"median a {statistics.median(rates['a']):.2f}, b {statistics.median(rates['b']):.2f} images/s; b / a = {ratio:.3f}; "
          f"same images: {sums['a'] == sums['b']} ({sums['a']!r} vs {sums['b']!r})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
