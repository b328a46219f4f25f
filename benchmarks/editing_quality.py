"""Editing quality and cost on the shipped model: inpainting (RePaint) and variations (SDEdit).

    python benchmarks/editing_quality.py -n 200 --out benchmarks/results/editing.json

Inpainting: the bottom half, the right half and a centre square of N held-out real digits (and of N of
the model's own samples) are repainted; reported: the share whose classified digit is the original's
(the classifier's own call on the original image), FD of the completions against N other held-out
digits (real vs real at the same N beside it), and the largest change of a known pixel (0: kept
exactly). Variations: K per input at strengths 0.25 / 0.5 / 0.75 / 1.0: the share that keeps the
input's class, and the diversity (mean feature distance between the K variations of one input).
Cost: seconds per image of an inpainting and of a variation chain against the plain chain of the
same sampler and steps, one batch each, alternating over rounds (ratios, one run); and the fused
step alone, plain vs every row inpainting (the extra bytes it reads per element).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.classifier import load_classifier, mnist_split
from ddpm.evaluate import _mean_pairwise_distance, classify, quality
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.precision import cpu_capability
from ddpm.seeding import image_seeds
from ddpm.shipped_models import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from kernels.philox import seeds_to_tensor
from kernels.reverse_step import EditTerms, StepCoefficients, fused_reverse_step_torch

MASKS = {
    "bottom half": (slice(14, 28), slice(0, 28)),
    "right half": (slice(0, 28), slice(14, 28)),
    "centre square": (slice(7, 21), slice(7, 21)),
}


def _mask(name: str) -> torch.Tensor:
    keep = torch.ones(1, 28, 28)
    rows, cols = MASKS[name]
    keep[:, rows, cols] = 0.0
    return keep


def _run(model, seeds: torch.Tensor, args: argparse.Namespace, batch: int, **chain: object) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One chain per image, in batches of ``batch`` (inputs, when per image, split alike)."""
    out = []
    init, mask = chain.pop("init_image", None), chain.pop("mask", None)
    with torch.inference_mode():
        for first in range(0, len(seeds), batch):
            part = slice(first, first + batch)
            extra = {} if init is None else {"init_image": init[part]}  # type: ignore[index]
            if mask is not None:
                extra["mask"] = mask.expand(len(seeds[part]), -1, -1, -1)  # type: ignore[attr-defined]
            out.append(sample(model.eps_model, model.schedule, seeds[part], model.image_shape, steps=args.steps, sampler=args.sampler,
                              spacing="trailing", variance_type=model.variance_type, **chain, **extra))  # fmt: skip
    return torch.cat(out)


def inpainting(model, classifier, inputs: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace) -> list[dict]:  # type: ignore[no-untyped-def]
    _, original_probs = classify(classifier, inputs)
    original = original_probs.argmax(1)
    real = quality(classifier, reference[: len(inputs)], reference[len(inputs) :])
    rows = []
    for name in MASKS:
        keep = _mask(name)
        settings = [(1, 10)] + ([(args.resample, 5)] if args.resample > 1 else [])
        for r, j in settings:
            start = time.perf_counter()
            images = _run(model, seeds_to_tensor(image_seeds(1, len(inputs))), args, args.batch, init_image=inputs, mask=keep,
                          jump_length=j, jump_n_sample=r)  # fmt: skip
            seconds = time.perf_counter() - start
            q = quality(classifier, images, reference[len(inputs) :])
            _, probs = classify(classifier, images)
            known = keep.bool().expand_as(images)
            rows.append({"mask": name, "jump_length": j, "jump_n_sample": r, "class_kept": float((probs.argmax(1) == original).mean()),
                         "fd": round(q.fd, 3), "fd_real_vs_real": round(real.fd, 3), "confident_share": round(q.confident_share, 3),
                         "known_pixels_max_change": float((images - inputs)[known].abs().max()), "seconds": round(seconds, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def variations(model, classifier, inputs: torch.Tensor, args: argparse.Namespace) -> list[dict]:  # type: ignore[no-untyped-def]
    k = args.variations
    _, original_probs = classify(classifier, inputs)
    original = np.repeat(original_probs.argmax(1), k)
    repeated = inputs.repeat_interleave(k, dim=0)
    rows = []
    for strength in (float(v) for v in args.strengths.split(",")):
        images = _run(model, seeds_to_tensor(image_seeds(2, len(repeated))), args, args.batch, init_image=repeated, strength=strength)
        feats, probs = classify(classifier, images)
        spread = statistics.fmean(_mean_pairwise_distance(feats[i * k : (i + 1) * k]) for i in range(len(inputs)))
        rows.append({"strength": strength, "class_kept": float((probs.argmax(1) == original).mean()), "diversity": round(spread, 3),
                     "mean_abs_change": round(float((images - repeated).abs().mean()), 3)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cost(model, inputs: torch.Tensor, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """Seconds per image, one batch, alternating plain / inpainting / variation over rounds."""
    seeds = seeds_to_tensor(image_seeds(3, args.batch))
    init = inputs[: args.batch]
    kinds = {
        "plain": {},
        "inpainting": {"init_image": init, "mask": _mask("bottom half")},
        "variation": {"init_image": init, "strength": 0.75},
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, chain in kinds.items():
            start = time.perf_counter()
            _run(model, seeds, args, args.batch, **dict(chain))
            times[name].append((time.perf_counter() - start) / args.batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: round(v / med["plain"], 3) for k, v in med.items()}
    return {"seconds_per_image": {k: round(v, 4) for k, v in med.items()}, "ratio_to_plain": ratios}


def serving(model, inputs: torch.Tensor, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """Images per second: the engine given a mix of plain, variation and inpainting requests at once (4
    images each, step-level batching over max_batch 64), against the offline sampler running each kind
    in one batch of the same size, one kind after the other."""
    from ddpm.chain import ChainSpec
    from ddpm.image_request import EditInput, ImageRequest
    from service.engine.engine import Engine
    from service.engine.job import Job

    m = args.serve_images  # per kind
    keep = _mask("bottom half")
    specs = {"plain": ChainSpec(args.steps, args.sampler, spacing="trailing"),
             "variation": ChainSpec(args.steps, args.sampler, spacing="trailing", strength=0.75),
             "inpainting": ChainSpec(args.steps, args.sampler, spacing="trailing", repaint=True)}  # fmt: skip
    specs = {k: v for k, v in specs.items() if k in args.serve_kinds.split(",")}
    start = time.perf_counter()
    for name, spec in specs.items():
        extra = {} if name == "plain" else {"init_image": inputs[:m]}
        if name == "inpainting":
            extra["mask"] = keep
        _run(model, seeds_to_tensor(image_seeds(5, m)), args, m, strength=spec.strength, **extra)
    offline = len(specs) * m / (time.perf_counter() - start)
    engine = Engine(model, max_batch=64, max_queue=10_000)
    engine.start()
    try:
        start = time.perf_counter()
        for first in range(0, m, 4):
            for name, spec in specs.items():
                image = inputs[first]
                edit = None if name == "plain" else EditInput.of(image, keep if name == "inpainting" else None)
                engine.submit(Job(ImageRequest(first, 4, spec, None, 0.0, edit), timeout_s=3600))
        engine.wait_idle(3600)
        served = len(specs) * (m // 4 * 4) / (time.perf_counter() - start)
    finally:
        engine.stop()
    return {"kinds": list(specs), "images_per_kind": m, "offline_images_per_s": round(offline, 2), "engine_images_per_s": round(served, 2),
            "ratio": round(served / offline, 3)}  # fmt: skip


def step_cost(args: argparse.Namespace) -> dict:
    """The fused step alone (the PyTorch twin on this CPU), a batch of 64 28x28 rows: plain vs all inpainting."""
    b, shape = 64, (1, 28, 28)
    x, eps = torch.randn(b, *shape), torch.randn(b, *shape)
    coefs = StepCoefficients(*(torch.rand(b) for _ in StepCoefficients.names()))
    known, mask = torch.rand(b, *shape), (torch.rand(b, *shape) > 0.5).float()
    edit = EditTerms(known, mask, torch.ones(b), torch.rand(b), torch.rand(b), torch.ones(b), torch.zeros(b))
    seeds, counter = seeds_to_tensor(image_seeds(0, b)), torch.arange(b)
    times: dict[str, list[float]] = {"plain": [], "inpainting": []}
    for _ in range(args.rounds * 20):
        for name, extra in (("plain", ()), ("inpainting", (None, edit))):
            start = time.perf_counter()
            fused_reverse_step_torch(x, eps, coefs, seeds, counter, *extra)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ms": {k: round(v * 1e3, 3) for k, v in med.items()}, "ratio": round(med["inpainting"] / med["plain"], 3),
            "bytes_per_element": {"plain": 12, "inpainting": 20}}  # fmt: skip  # fp32: x, eps read + out written; + known, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="inputs per measurement")
    parser.add_argument("--steps", type=int, default=50, help="U-Net calls per image (of the part run)")
    parser.add_argument("--sampler", default="ddpm", help="ddpm or ddim (inpainting)")
    parser.add_argument("--resample", type=int, default=2, help="also inpaint with RePaint's resampling r (jump 5); 1: not")
    parser.add_argument("--variations", type=int, default=4, help="variations per input")
    parser.add_argument("--batch", type=int, default=100, help="images per U-Net call")
    parser.add_argument("--rounds", type=int, default=3, help="cost: rounds per kind")
    parser.add_argument("--serve-kinds", default="plain,variation,inpainting", help="serving: the request kinds mixed")
    parser.add_argument("--strengths", default="0.25,0.5,0.75,1.0", help="variations: the strengths")
    parser.add_argument("--serve-images", type=int, default=64, help="serving: images per kind (plain, variation, inpainting)")
    parser.add_argument("--only", default=None, help="run one part: step_cost, cost, serving, inpainting, variations")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model_source(DEFAULT_MODEL)
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    split = mnist_split()
    perm = torch.randperm(len(split.test_x), generator=torch.Generator().manual_seed(0))
    inputs, reference = split.test_x[perm[: args.n]], split.test_x[perm[args.n : 3 * args.n]]
    report: dict[str, object] = {"cpu": platform.processor() or platform.machine(), "cpu_capability": cpu_capability(),
                                 "torch_threads": torch.get_num_threads(), "n": args.n, "steps": args.steps,
                                 "sampler": args.sampler}  # fmt: skip
    def own_samples() -> torch.Tensor:
        return _run(model, seeds_to_tensor(image_seeds(4, args.n)), args, args.batch)

    parts = {
        "step_cost": lambda: step_cost(args),
        "cost": lambda: cost(model, inputs, args),
        "serving": lambda: serving(model, inputs, args),
        "inpainting_real": lambda: inpainting(model, classifier, inputs, reference, args),
        "inpainting_own_samples": lambda: inpainting(model, classifier, own_samples(), reference, args),
        "variations": lambda: variations(model, classifier, inputs[: max(2, args.n // args.variations)], args),
    }
    for name, part in parts.items():
        if args.only is None or name.startswith(args.only):
            report[name] = part()
            print(json.dumps({name: report[name]}), flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
