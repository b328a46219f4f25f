"""Sample quality against U-Net calls per image: every sampler at several step counts, the same seeds.

    python benchmarks/quality_table.py run -n 500 --out benchmarks/results/quality_table.jsonl   # resumable
    python benchmarks/quality_table.py speed --out benchmarks/results/quality_speed.jsonl                # on a quiet machine
    python benchmarks/quality_table.py report benchmarks/results/quality_table.jsonl --speed benchmarks/results/quality_speed.jsonl \
        --plot benchmarks/results/quality_vs_calls.png

``run`` evaluates each cell (sampler, steps, eta, spacing) as ``ddpm eval`` does (the same classifier,
the same held-out reference split, images k = 0..N-1 of seed 0), on one compiled hot path built once, and
appends one JSON line per cell, so an interrupted run resumes where it stopped. ``speed`` times each
cell's images per second on that hot path (one batch, after every graph it needs was built), apart
from ``run`` so that it can run alone on a quiet machine; ``report`` prefers its figures. The
reference spread (real vs real over ``--splits`` random splits of the held-out digits at the same N)
says how far apart two sets of real digits already are: cells closer than that cannot be told apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.classifier import load_classifier
from ddpm.evaluate import evaluate, quality, real_reference
from ddpm.inference_compile import HotPath, hot_path
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.precision import cpu_capability
from ddpm.seeding import image_seeds
from ddpm.shipped_models import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from kernels.philox import seeds_to_tensor

DEFAULT_CELLS = (
    [("ddpm", 1000, 0.0, "linspace")]  # the paper's chain
    + [(s, n, 0.0, "trailing") for s in ("dpmsolver++", "ddim", "ddpm", "sde-dpmsolver++") for n in (5, 10, 20, 50, 100, 250)]
)


def parse_cell(text: str) -> tuple[str, int, float, str]:
    """sampler:steps[:eta[:spacing]], e.g. ddim:20:0.5:trailing."""
    parts = text.split(":")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0, parts[3] if len(parts) > 3 else "trailing"


def key(cell: dict | tuple) -> tuple:  # type: ignore[type-arg]
    if isinstance(cell, dict):
        return (cell["sampler"], cell["steps"], cell["eta"], cell["spacing"])
    return tuple(cell)


ChainFn = Callable[[str, int, float, str, torch.Tensor], torch.Tensor]


def sampler_on_hot_path(args: argparse.Namespace, parts: list[torch.Tensor], samplers: set[str]) -> tuple[ChainFn, HotPath]:
    """The shipped model on one hot path, and a function running one cell's chain over a batch of seeds;
    every graph the cells need (batch sizes, with and without multistep state) is built before it returns."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    model = load_model_source(args.model, device)
    fast = hot_path(model.eps_model, model.module, device, args.compile, precision=args.precision)

    def chain(sampler: str, steps: int, eta: float, spacing: str, seeds: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return sample(fast.eps_model, model.schedule, seeds, model.image_shape, steps=steps, variance_type=model.variance_type,
                          clip_denoised=model.clip_denoised, sampler=sampler, eta=eta, spacing=spacing, step_fn=fast.step_fn,
                          device=device)  # fmt: skip

    for sampler in samplers:
        for part in {len(p): p for p in parts}.values():
            chain(sampler, 4, 0.0, "trailing", part)  # 4 calls: restart's shortest chain with its jump (a graph of its own)
    print(f"{where(device)}; threads {torch.get_num_threads()}; precision {fast.precision}; step {fast.step_backend}", file=sys.stderr)
    return chain, fast


def where(device: str) -> str:
    """The machine a figure was measured on: the CPU's name and flags, or the GPU's name."""
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_capability()


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {key(json.loads(line)) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()} if out.exists() else set()
    cells = [parse_cell(c) for c in args.cells] if args.cells else DEFAULT_CELLS
    todo = [c for c in cells if key(c) not in done]
    classifier = load_classifier(args.classifier)
    batches = list(seeds_to_tensor(image_seeds(args.seed, args.n)).split(args.batch_size))
    chain, fast = sampler_on_hot_path(args, batches, {c[0] for c in todo})
    for sampler, steps, eta, spacing in todo:
        start = time.perf_counter()
        images = torch.cat([chain(sampler, steps, eta, spacing, part) for part in batches])
        seconds = time.perf_counter() - start
        report = evaluate(classifier, images, seed=0)
        row = {
            "sampler": sampler, "steps": steps, "eta": eta, "spacing": spacing, "n": args.n, "seed": args.seed,
            "fd": report["samples"]["fd"], "confident_share": report["samples"]["confident_share"],
            "class_entropy": report["samples"]["class_entropy"], "real_fd": report["real_vs_real"]["fd"],
            "real_confident_share": report["real_vs_real"]["confident_share"], "seconds": round(seconds, 2),
            "images_per_s": round(args.n / seconds, 3), "precision": fast.precision, "cpu": where(getattr(args, "device", "cpu")),
            "threads": torch.get_num_threads(),
        }  # fmt: skip
        print(json.dumps(row), file=sys.stderr)
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def speed(args: argparse.Namespace) -> None:
    """Images per second per cell: one batch of --batch-size images, after a warm-up of every graph."""
    seeds = seeds_to_tensor(image_seeds(args.seed, args.batch_size))
    cells = [parse_cell(c) for c in args.cells] if args.cells else DEFAULT_CELLS
    chain, fast = sampler_on_hot_path(args, [seeds], {c[0] for c in cells})
    for sampler, steps, eta, spacing in cells:
        start = time.perf_counter()
        chain(sampler, steps, eta, spacing, seeds)
        seconds = time.perf_counter() - start
        row = {"sampler": sampler, "steps": steps, "eta": eta, "spacing": spacing, "batch": args.batch_size,
               "images_per_s": round(args.batch_size / seconds, 3), "image_steps_per_s": round(args.batch_size * steps / seconds, 1),
               "precision": fast.precision, "cpu": cpu_capability(), "threads": torch.get_num_threads()}  # fmt: skip
        print(json.dumps(row), file=sys.stderr)
        with Path(args.out).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def spread(n: int, splits: int, classifier_dir: str) -> dict[str, float]:
    """Real vs real at this N over several random splits of the held-out digits: mean and std."""
    classifier = load_classifier(classifier_dir)
    fds, shares = [], []
    for k in range(splits):
        a, b = real_reference(n, seed=k)
        q = quality(classifier, b, a)
        fds.append(q.fd)
        shares.append(q.confident_share)
    return {"fd_mean": statistics.mean(fds), "fd_std": statistics.stdev(fds), "share_mean": statistics.mean(shares),
            "share_std": statistics.stdev(shares), "splits": splits}  # fmt: skip


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.speed:  # images/s from the quiet-machine run, where it has the cell
        lines = Path(args.speed).read_text(encoding="utf-8").splitlines()
        timed = {key(r): r for r in (json.loads(line) for line in lines if line.strip())}
        for r in rows:
            if key(r) in timed:
                r["images_per_s"] = timed[key(r)]["images_per_s"]
                r["seconds"] = r["n"] / r["images_per_s"]
    n = rows[0]["n"]
    ref = spread(n, args.splits, args.classifier)
    full = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 1000), None)
    print(f"N = {n}; real vs real over {ref['splits']} splits: FD {ref['fd_mean']:.2f} +- {ref['fd_std']:.2f}, "
          f"confident share {ref['share_mean']:.3f} +- {ref['share_std']:.3f} (std); CPU {rows[0]['cpu']}, "
          f"{rows[0]['threads']} threads, U-Net {rows[0]['precision']}\n")  # fmt: skip
    print("| sampler | spacing | U-Net calls | FD | confident share | class entropy | images/s | vs 1000-step DDPM time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["sampler"], r["steps"])):
        speedup = f"{full['seconds'] / r['seconds']:.0f}x" if full else ""
        eta = f" (eta {r['eta']:g})" if r["sampler"] == "ddim" else ""
        print(f"| {r['sampler']}{eta} | {r['spacing']} | {r['steps']} | {r['fd']:.2f} | {r['confident_share']:.3f} | "
              f"{r['class_entropy']:.3f} | {r['images_per_s']:.2f} | {speedup} |")  # fmt: skip
    if args.plot:
        plot(rows, ref, args.plot)


def plot(rows: list[dict], ref: dict[str, float], path: str) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, ref_mean, ref_std, label in [
        (axes[0], "fd", ref["fd_mean"], ref["fd_std"], "FD to held-out digits (lower is better)"),
        (axes[1], "confident_share", ref["share_mean"], ref["share_std"], "confident share (higher is better)"),
    ]:
        ax.axhspan(ref_mean - ref_std, ref_mean + ref_std, color="0.85", label="real vs real (mean +- std)")
        for sampler, marker in [("ddpm", "o"), ("ddim", "s"), ("dpmsolver++", "^"), ("sde-dpmsolver++", "v"), ("restart", "D")]:
            # trailing spacing (the full chain: linspace, its only spacing); the spacing trials stay in the table
            shown = [r for r in rows if r["sampler"] == sampler and (r["spacing"] == "trailing" or r["steps"] == 1000)]
            pts = sorted((r["steps"], r[metric]) for r in shown)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=sampler)
        ax.set_xscale("log")
        ax.set_xlabel("U-Net calls per image")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"shipped MNIST model, N = {rows[0]['n']}, same seeds per cell", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default=str(DEFAULT_MODEL))
    r.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    r.add_argument("-n", type=int, default=500)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--compile", default="on", choices=["on", "off", "auto"])
    r.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    r.add_argument("--device", default="cpu", help="cpu or cuda (the GPU machine: the same cells in seconds)")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--cells", nargs="*", help="sampler:steps[:eta[:spacing]] (default: the table's grid)")
    r.add_argument("--out", default="benchmarks/results/quality_table.jsonl")
    r.set_defaults(func=run)
    t = sub.add_parser("speed")
    t.add_argument("--model", default=str(DEFAULT_MODEL))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--compile", default="on", choices=["on", "off", "auto"])
    t.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--cells", nargs="*")
    t.add_argument("--out", default="benchmarks/results/quality_speed.jsonl")
    t.set_defaults(func=speed)
    p = sub.add_parser("report")
    p.add_argument("--speed", default=None, help="images/s from a `speed` run (JSON lines)")
    p.add_argument("results")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--plot", default=None)
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
