"""Smoke tests on the model that ships in models/mnist-28 (few steps: the full chain is for `ddpm eval`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.model_source import load_model_source
from ddpm.shipped_models import DEFAULT_CLASSIFIER, DEFAULT_MODEL
from tests.command_in_process import run_command

pytestmark = pytest.mark.slow


def _sample(tmp_path: Path, name: str, *args: str) -> Path:
    """``ddpm sample`` in this process (a fresh one per call cost ~3 s of imports, 8 calls here); the distilled
    model's refusal below runs in a process of its own."""
    out = tmp_path / name
    ran = run_command(["sample", "--quiet", "-o", str(out), *args])
    assert ran.code == 0, ran.stderr[-2000:]
    return out


def test_shipped_model_loads() -> None:
    model = load_model_source(DEFAULT_MODEL)
    assert model.source == "ddpm-serve" and model.image_shape == (1, 28, 28)
    assert model.schedule.num_timesteps == 1000 and model.schedule.kind == "linear"
    assert model.info["training"]["data"] == "mnist" and model.info["training"]["steps"] > 0
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 20 * 2**20


def test_sample_cli_is_reproducible(tmp_path: Path) -> None:
    a = np.load(_sample(tmp_path, "a.npy", "--seed", "3", "-n", "4", "--steps", "20"))
    b = np.load(_sample(tmp_path, "b.npy", "--seed", "3", "-n", "4", "--steps", "20", "--batch-size", "1"))
    c = np.load(_sample(tmp_path, "c.npy", "--seed", "4", "-n", "4", "--steps", "20"))
    assert a.shape == (4, 1, 28, 28) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    # batch size does not change image k beyond float rounding in the batched convolutions
    # (measured 3.4e-5 in [0, 1] over 20 steps of the shipped model): under half a PNG level
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a - c).max() > 0.1
    grid = Image.open(_sample(tmp_path, "g.png", "--seed", "3", "-n", "4", "--steps", "20"))
    assert grid.size == (2 + 2 * 30, 2 + 2 * 30)
    pixels = np.asarray(grid)[2:30, 2:30].astype(np.float32) / 255
    assert np.abs(pixels - a[0, 0]).max() <= 1 / 255 + 1e-6


def test_shipped_samples_look_like_digits(tmp_path: Path) -> None:
    """With a 50-step respaced chain the classifier already finds most samples confidently digits."""
    import torch

    from ddpm.classifier import load_classifier
    from ddpm.evaluate import classify

    x = np.load(_sample(tmp_path, "d.npy", "--seed", "0", "-n", "32", "--steps", "50"))
    _, probs = classify(load_classifier(DEFAULT_CLASSIFIER), torch.from_numpy(x) * 2 - 1)
    assert (probs.max(1) >= 0.9).mean() >= 0.5
    assert len(set(probs.argmax(1).tolist())) >= 6


CONDITIONAL_MODEL = DEFAULT_MODEL.parent / "mnist-28-cond"


def test_shipped_conditional_model_gives_the_asked_digit(tmp_path: Path) -> None:
    """models/mnist-28-cond asked for digits 0..9 twice (its card's guidance scale, a 30-step chain):
    the evaluation classifier reads back the asked digit, and another scale gives other images."""
    import torch

    from ddpm.classifier import load_classifier
    from ddpm.evaluate import classify

    model = load_model_source(CONDITIONAL_MODEL)
    assert model.conditional and model.class_names == [str(d) for d in range(10)]
    w = model.guidance_scale
    assert w is not None and w >= 0
    asked = list(range(10)) * 2
    labels = ",".join(map(str, asked))
    chain = ("--model", str(CONDITIONAL_MODEL), "--steps", "30", "--sampler", "sde-dpmsolver++")
    x = np.load(_sample(tmp_path, "c.npy", *chain, "-n", "20", "--class-label", labels))
    _, probs = classify(load_classifier(DEFAULT_CLASSIFIER), torch.from_numpy(x) * 2 - 1)
    agreement = (probs.argmax(1) == torch.tensor(asked)).float().mean().item()
    assert agreement >= 0.8, agreement  # N = 500 at 50 steps: see its model card
    # images 0 and 1 of the same seed and chain at another scale (image k does not depend on the batch around it)
    other = np.load(_sample(tmp_path, "o.npy", *chain, "-n", "2", "--class-label", "0,1", "--guidance-scale", str(w + 1)))
    assert other.shape == (2, *x.shape[1:]) and np.abs(other - x[:2]).max() > 0.1


DISTILLED_MODEL = DEFAULT_MODEL.parent / "mnist-28-distilled"


def test_shipped_distilled_model_runs_its_four_calls_and_refuses_others(tmp_path: Path) -> None:
    """models/mnist-28-distilled (ddpm distill of the shipped model): a request that names no chain gets
    its own 4-step DDIM chain, and most of its samples are confidently digits; another chain is refused."""
    import torch

    from ddpm.classifier import load_classifier
    from ddpm.evaluate import classify

    model = load_model_source(DISTILLED_MODEL)
    assert model.distilled_chain == {"sampler": "ddim", "steps": 4, "timestep_spacing": "trailing"}
    assert (DISTILLED_MODEL / "model.safetensors").stat().st_size < 20 * 2**20
    x = np.load(_sample(tmp_path, "d.npy", "--model", str(DISTILLED_MODEL), "--seed", "0", "-n", "32"))
    _, probs = classify(load_classifier(DEFAULT_CLASSIFIER), torch.from_numpy(x) * 2 - 1)
    assert (probs.max(1) >= 0.9).mean() >= 0.5  # N = 500: 0.75 (its model card)
    assert len(set(probs.argmax(1).tolist())) >= 6
    refused = subprocess.run([sys.executable, "-m", "commands.main", "sample", "--model", str(DISTILLED_MODEL), "--steps", "10", "-o",
                              str(tmp_path / "r.png")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode != 0 and "distilled" in refused.stderr and "--steps" in refused.stderr
