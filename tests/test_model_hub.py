"""``--model org/name[@revision]`` through the Hugging Face hub cache, offline (HF_HUB_OFFLINE=1) with
a cache the test lays out itself; and the published google/ddpm-cifar10-32 shape served from it."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import ModelCard, save_model
from ddpm.model_hub import hub_reference, model_name
from tests.published_ddpm import REPO_ID, lay_out_hub_cache, save_cifar10_shaped_pipeline
from tests.server_process import ServerProcess
from tests.tiny_model import TINY, random_tiny_unet, save_tiny_model

pytest.importorskip("huggingface_hub")


def test_hub_references(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_reference("org/name") == ("org/name", None)
    assert hub_reference("google/ddpm-cifar10-32@main") == ("google/ddpm-cifar10-32", "main")
    assert hub_reference("org/name@0123456789abcdef0123456789abcdef01234567") == ("org/name", "0123456789abcdef0123456789abcdef01234567")
    for path in ("./org/name", "/abs/path", "~/x/y", "a/b/c", "name", "org/name@"):
        assert hub_reference(path) is None, path
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    assert hub_reference("models/mnist-28") is None  # an existing directory wins over the repository id shape
    assert model_name("org/name@v1") == "org/name@v1" and model_name("models/mnist-28") == "mnist-28"


def _weights_sha(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """org/tiny: commit A tagged v1, then commit B (other weights) on main."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    a = save_tiny_model(root / "a", num_timesteps=40)
    unet = random_tiny_unet()
    with torch.no_grad():
        next(unet.parameters()).add_(0.5)
    b = save_model(root / "b", unet, ModelCard(unet=TINY, num_timesteps=40))
    commit_a = lay_out_hub_cache(cache, "org/tiny", a, commit="a" * 40, refs=("v1",))
    commit_b = lay_out_hub_cache(cache, "org/tiny", b, commit="b" * 40, refs=("main",))
    return cache, {"A": _weights_sha(a), "B": _weights_sha(b), "commit_a": commit_a, "commit_b": commit_b}


def _offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home")}


def _ddpm_info(cache: Path, model: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "commands.main", "info", "--model", model], env=_offline_env(cache),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


# `ddpm info` once per reference in one process (the CLI's own entry point; a process start imports torch and the hub)
_INFO_EACH = "import sys; from commands.main import main; [print(main(['info', '--model', spec]), flush=True) for spec in sys.argv[1:]]"


def test_revisions_resolve_offline(hub_cache: tuple[Path, dict[str, str]]) -> None:
    cache, expect = hub_cache
    expected = [("org/tiny", "B"), ("org/tiny@v1", "A"), (f"org/tiny@{expect['commit_a']}", "A"), ("org/tiny@main", "B")]
    result = subprocess.run([sys.executable, "-c", _INFO_EACH, *(spec for spec, _ in expected)], env=_offline_env(cache),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    values, rest, decoder = [], result.stdout.strip(), json.JSONDecoder()  # each report, then its exit code: JSON values in a row
    while rest:
        value, end = decoder.raw_decode(rest)
        values.append(value)
        rest = rest[end:].lstrip()
    reports = values[0::2]
    assert values[1::2] == [0] * len(expected) and len(reports) == len(expected), result.stdout[-2000:]
    for report, (spec, weights) in zip(reports, expected, strict=True):
        assert report["weights_sha256"] == expect[weights] and report["name"] == spec, spec
    missing = _ddpm_info(cache, "org/absent")
    assert missing.returncode != 0 and "cannot resolve hub model org/absent" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    unknown_revision = _ddpm_info(cache, "org/tiny@v9")
    assert unknown_revision.returncode != 0 and "revision v9" in unknown_revision.stderr


def test_serve_exits_with_the_reason_when_the_repository_is_not_cached(hub_cache: tuple[Path, dict[str, str]]) -> None:
    cache, _ = hub_cache
    server = ServerProcess("org/absent", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))  # type: ignore[arg-type]
    try:
        assert server.proc.wait(60) == 1
        assert "cannot resolve hub model org/absent" in server.output()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cifar_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("cifar")
    pipeline = save_cifar10_shaped_pipeline(root / "ddpm-cifar10-32")
    lay_out_hub_cache(root / "cache", REPO_ID, pipeline)
    # max batch 2: the warm-up runs every step variant at batch 1, 2 and max_batch, and a 35.7M U-Net (12 GFLOP
    # per image and step) at ServerProcess's 8 rows costs CPU no test here needs
    server = ServerProcess(REPO_ID, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(root / "cache"), DDPM_COMPILE="off",  # type: ignore[arg-type]
                           DDPM_PRECISION="fp32", DDPM_THREADS="2", DDPM_MAX_BATCH="2", DDPM_WARMUP_STEPS="1")  # fmt: skip
    try:
        server.wait_ready(120)
        yield server, pipeline
    finally:
        server.stop()


def test_the_published_cifar10_shape_serves_from_the_hub_cache(cifar_server: tuple[ServerProcess, Path]) -> None:
    server, pipeline = cifar_server
    info = httpx.get(server.url + "/info", timeout=10).json()
    m = info["model"]
    assert m["name"] == REPO_ID and m["source"] == "diffusers" and m["parameters"] == 35_746_307  # "35.7M" on the model card
    assert m["weights_sha256"] == hashlib.sha256((pipeline / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert m["image_shape"] == [3, 32, 32] and m["variance_type"] == "fixed_large" and m["timestep_spacing"] == "leading"
    assert 11 < m["gflop_per_image_step"] < 13
    r = httpx.post(server.url + "/generate", json={"seed": 0, "batch_size": 2, "steps": 2}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == REPO_ID
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (32, 32) and image.mode == "RGB"
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert [d["id"] for d in models["data"]] == [REPO_ID]
