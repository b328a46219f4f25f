"""Sample quality against real digits, in the feature space of our own digit classifier.

- FD: the Frechet distance between Gaussians fitted to classifier features (as FID does with
  Inception features): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
- confident share: the fraction of images the classifier labels with probability >= 0.9.
- class entropy: the entropy (nats) of the histogram of predicted classes; log(10) = 2.303 is uniform.
The same numbers for two disjoint halves of held-out real digits give the scale (real vs real).
FD is biased upwards at small N, so compare figures at equal N only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg
import torch

from ddpm.classifier import HELD_OUT, INPUT_SIZE, DigitClassifier, mnist_split
from ddpm.data import fit_to_size


@dataclass
class Quality:
    n: int
    fd: float
    confident_share: float
    class_entropy: float
    class_histogram: list[int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)  # (scipy >= 1.16 dropped disp; the matrix alone either way)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals, as FID implementations do
        offset = np.eye(len(cov1)) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, 64) and class probabilities (N, 10) of images in [-1, 1], any size."""
    x = fit_to_size(images.float().cpu(), INPUT_SIZE)
    feats, probs = [], []
    for chunk in x.split(500):
        f = classifier.features(chunk)
        feats.append(f.numpy().astype(np.float64))
        probs.append(torch.softmax(classifier.logits_head(f), 1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def quality(classifier: DigitClassifier, images: torch.Tensor, reference: torch.Tensor) -> Quality:
    feats, probs = classify(classifier, images)
    ref_feats, _ = classify(classifier, reference)
    hist = np.bincount(probs.argmax(1), minlength=10)
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return Quality(
        n=len(images),
        fd=frechet_distance(*_stats(feats), *_stats(ref_feats)),
        confident_share=float((probs.max(1) >= 0.9).mean()),
        class_entropy=entropy,
        class_histogram=hist.tolist(),
    )


def reference_size_problem(n: int, labels: Sequence[int] | None = None) -> str | None:
    """Why n samples (of classes ``labels``) cannot be evaluated (None when they can): the reference is two disjoint
    sets of n held-out digits, and a class's FD needs at least two of its samples (a covariance)."""
    half = HELD_OUT // 2  # a constant of the split: no need to load the digits to know it
    if not 2 <= n <= half:
        return f"n must be in 2..{half} (two disjoint halves of the held-out digits)"
    counts = Counter(labels or [])
    alone = sorted(c for c, k in counts.items() if k < 2)
    if not alone:
        return None
    which = f"class {alone[0]} has" if len(alone) == 1 else f"classes {', '.join(map(str, alone))} have"
    return f"a class's FD needs two or more of its images: {which} one"


def real_reference(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of n held-out real digits (n <= 500), class-balanced in expectation."""
    problem = reference_size_problem(n)
    if problem:
        raise ValueError(problem)
    test_x = mnist_split().test_x
    perm = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(seed))
    return test_x[perm[:n]], test_x[perm[n : 2 * n]]


def evaluate(classifier: DigitClassifier, samples: torch.Tensor, seed: int = 0) -> dict[str, object]:
    """Quality of samples vs n held-out real digits, and real vs real at the same n."""
    n = len(samples)
    real_a, real_b = real_reference(n, seed)
    ours = quality(classifier, samples, real_a)
    ref = quality(classifier, real_b, real_a)
    return {
        "samples": ours.to_dict(),
        "real_vs_real": ref.to_dict(),
        "fd_ratio": ours.fd / ref.fd if ref.fd > 0 else math.inf,
        "confident_share_gap": ref.confident_share - ours.confident_share,
    }


def _mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance between distinct pairs: how spread out (diverse) a set is."""
    if len(features) < 2:
        return 0.0
    sq = (features**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * features @ features.T, 0.0)
    n = len(features)
    return float(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean())


def evaluate_conditional(classifier: DigitClassifier, samples: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, object]:
    """Samples asked for classes ``labels`` (N,) against the held-out real digits of each class:

    - agreement: the share of samples the classifier puts in the class asked for;
    - per-class FD: FD between a class's samples and that class's real digits (first half), averaged over
      classes, beside the same for as many of the class's other real digits (real vs real, the scale at that n);
    - diversity: mean pairwise feature distance within a class, samples / real (1: as varied as real;
      guidance trades it for fidelity);
    plus the unconditional figures (FD, confident share, class entropy) of ``evaluate``.
    """
    split = mnist_split()
    perm = torch.Generator().manual_seed(seed)
    feats, probs = classify(classifier, samples)
    labels_np = labels.cpu().numpy()
    per_class = {}
    for c in sorted(set(labels_np.tolist())):
        real = split.test_x[split.test_y == c]
        real = real[torch.randperm(len(real), generator=perm)]
        mine = feats[labels_np == c]
        # the reference: the class's first half of held-out digits; the real-vs-real scale compares the second
        # half with it at the samples' own count (FD is biased upwards at small n: compare equal n only)
        half = len(real) // 2
        real_a, _ = classify(classifier, real[:half])
        real_b, _ = classify(classifier, real[half : half + min(half, len(mine))])
        per_class[str(c)] = {
            "n": len(mine),
            "agreement": float((probs[labels_np == c].argmax(1) == c).mean()),
            "fd": frechet_distance(*_stats(mine), *_stats(real_a)),
            "fd_real_vs_real": frechet_distance(*_stats(real_b), *_stats(real_a)),
            "diversity": _mean_pairwise_distance(mine) / _mean_pairwise_distance(real_a),
        }
    classes = list(per_class.values())
    return {
        "agreement": float((probs.argmax(1) == labels_np).mean()),
        "per_class_fd": float(np.mean([c["fd"] for c in classes])),
        "per_class_fd_real_vs_real": float(np.mean([c["fd_real_vs_real"] for c in classes])),
        "diversity": float(np.mean([c["diversity"] for c in classes])),
        "per_class": per_class,
        **evaluate(classifier, samples, seed),
    }
