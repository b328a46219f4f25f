"""Editing over HTTP: /generate (and its stream) take an input image and a mask as base64 PNGs, answer
the offline sampler's images, keep the known pixels exactly, echo the input's hash, key the cache and
the ETag on it, and refuse a wrong size, mode, format or field combination with a 422 naming the field."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from tests.app_client import app_client, wait_ready


def _png(array: np.ndarray, mode: str | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


DIGIT = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)  # an 8x8 grey input
ALPHA = np.full((8, 8), 255, dtype=np.uint8)
ALPHA[4:, :] = 0  # repaint the bottom half (OpenAI: alpha 0 marks what to edit)
MASK = _png(np.stack([np.zeros((8, 8), np.uint8), ALPHA], axis=-1), "LA")


def test_a_variation_is_the_offline_sdedit_chain(client: TestClient, model_dir: Path) -> None:
    body = {"seed": 4, "batch_size": 2, "sampler": "ddim", "steps": 6, "image": _png(DIGIT), "strength": 0.5}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["strength"] == 0.5 and answer["jump_length"] is None and len(answer["input_sha256"]) == 64
    model = load_model_source(model_dir)
    init = torch.from_numpy(DIGIT / 127.5 - 1.0).float()[None]
    with torch.inference_mode():
        offline = sample(model.eps_model, model.schedule, seeds_to_tensor(image_seeds(4, 2)), model.image_shape, steps=6,
                         variance_type=model.variance_type, sampler="ddim", spacing="trailing", strength=0.5, init_image=init)  # fmt: skip
    expected = np.round((offline.clamp(-1, 1) + 1) / 2 * 255).numpy().astype(np.int64)[:, 0]
    got = np.stack([_pixels(b).astype(np.int64) for b in answer["images"]])
    assert np.abs(got - expected).max() <= 1  # PNG rounding of float32 noise in the batched U-Net


def test_inpainting_keeps_the_known_pixels_and_keys_the_cache_on_the_input(client: TestClient) -> None:
    body = {"seed": 1, "steps": 5, "sampler": "ddim", "image": _png(DIGIT), "mask": MASK, "jump_length": 2, "jump_n_sample": 2}
    first = client.post("/generate", json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert (answer["strength"], answer["jump_length"], answer["jump_n_sample"]) == (1.0, 2, 2)
    out = _pixels(answer["images"][0])
    assert np.array_equal(out[:4], DIGIT[:4])  # the known half, exactly
    again = client.post("/generate", json=body)
    assert again.json()["cached"] and again.headers["etag"] == first.headers["etag"]
    other = client.post("/generate", json={**body, "image": _png(255 - DIGIT)})
    assert other.headers["etag"] != first.headers["etag"] and other.json()["input_sha256"] != answer["input_sha256"]
    plain = client.post("/generate", json={"seed": 1, "steps": 5, "sampler": "ddim"})
    assert plain.json()["input_sha256"] is None and plain.headers["etag"] != first.headers["etag"]


def test_an_array_client_sends_npy(client: TestClient) -> None:
    """``application/x-npy`` clients send the arrays they get back: base64 .npy, (C, H, W) in [0, 1]."""

    def npy(array: np.ndarray) -> str:
        buf = io.BytesIO()
        np.save(buf, array)
        return base64.b64encode(buf.getvalue()).decode()

    keep = (ALPHA > 0).astype(np.float32)[None]
    body = {"seed": 6, "steps": 4, "sampler": "ddim"}
    png = client.post("/generate", json={**body, "image": _png(DIGIT), "mask": MASK}).json()
    arrays = client.post("/generate", json={**body, "image": npy((DIGIT / 255.0)[None]), "mask": npy(keep)}).json()
    assert arrays["input_sha256"] == png["input_sha256"] and arrays["images"] == png["images"]
    bad = client.post("/generate", json={**body, "image": npy(np.zeros((3, 8, 8)))})
    assert bad.status_code == 422 and "(1, 8, 8) in [0, 1]" in bad.json()["detail"]


def test_an_inpainting_request_streams_its_calls(client: TestClient) -> None:
    body = {"seed": 2, "steps": 4, "image": _png(DIGIT), "mask": MASK, "jump_length": 2, "jump_n_sample": 2}
    with client.stream("POST", "/generate/stream", json=body) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    result = json.loads(events[-1][5:])
    assert result["sampler"] == "ddpm" and result["jump_n_sample"] == 2  # a mask without a sampler: Algorithm 2's step
    progress = [json.loads(e[5:]) for e in events[1:-1]]
    assert progress and progress[-1]["total"] == 6  # 4 steps and one resampling of 2: 6 U-Net calls


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"image": _png(np.zeros((64, 64, 3), np.uint8))}, "image", "this model takes 8x8 grey PNGs"),
        ({"image": _png(np.dstack([DIGIT, 255 - DIGIT, DIGIT]))}, "image", "RGB PNG whose red, green and blue differ"),
        ({"image": base64.b64encode(b"GIF89a not a png").decode()}, "image", "not a PNG, JPEG, WebP or .npy array"),
        ({"image": "%%%"}, "image", "not base64"),
        ({"image": None, "mask": MASK}, "mask", "needs an input image"),
        ({"image": None, "strength": 0.5}, "strength", "needs an input image"),
        ({"mask": _png(np.zeros((4, 4), np.uint8))}, "mask", "is 4x4"),
        ({"mask": _png(np.full((8, 8), 255, np.uint8))}, "mask", "marks nothing to repaint"),
        ({"strength": 0.0}, "strength", "greater than 0"),
        ({"jump_length": 3}, "jump_length", "inpainting"),
        ({"mask": MASK, "sampler": "dpmsolver++"}, "sampler", "ddpm or ddim"),
        ({"strength": 0.01, "steps": 5}, "steps", "at strength 0.01"),
    ],
)
def test_bad_edits_are_422_naming_the_field(client: TestClient, change: dict, field: str, words: str) -> None:
    body = {"seed": 0, "steps": 3, "sampler": "ddim", "image": _png(DIGIT), **change}
    r = client.post("/generate", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"] and words in r.json()["detail"], r.json()["detail"]


def test_ddpm_sample_edits_from_the_command_line(model_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "in.png").write_bytes(base64.b64decode(_png(DIGIT)))
    (tmp_path / "mask.png").write_bytes(base64.b64decode(MASK))
    out = tmp_path / "out.npy"
    cmd = [sys.executable, "-m", "commands.main", "sample", "--model", str(model_dir), "-n", "2", "--steps", "4", "--sampler", "ddim",
           "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--jump-length", "2", "--jump-n-sample",
           "2", "--compile", "off", "--quiet", "-o", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    images = np.load(out)  # (N, C, H, W) in [0, 1]
    assert np.abs(images[:, 0, :4] - DIGIT[:4] / 255.0).max() < 1e-6  # the known half
    bad = subprocess.run([*cmd[:-2], "--strength", "1.5", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "strength" in bad.stderr
    # a photo of another size (here 3x the model's, as a phone's would be larger still) with --resize: its pixels fitted to
    # the model's (ddpm/input_fit.py) are the known half, the mask's hole kept exactly
    from ddpm.input_fit import fitted_png

    big = np.kron(DIGIT, np.ones((3, 3), dtype=np.uint8))
    (tmp_path / "big.png").write_bytes(base64.b64decode(_png(big)))
    big_alpha = np.kron(ALPHA, np.ones((3, 3), dtype=np.uint8))
    (tmp_path / "big-mask.png").write_bytes(base64.b64decode(_png(np.stack([np.zeros((24, 24), np.uint8), big_alpha], axis=-1), "LA")))
    sized = [*cmd[:12], "--init-image", str(tmp_path / "big.png"), "--mask", str(tmp_path / "big-mask.png"), *cmd[16:]]
    refused = subprocess.run(sized, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "24x24" in refused.stderr
    resized = subprocess.run([*sized, "--resize"], capture_output=True, text=True, timeout=120)
    assert resized.returncode == 0, resized.stderr
    known = np.asarray(Image.open(io.BytesIO(fitted_png(base64.b64decode(_png(big)), (1, 8, 8)))))[:4] / 255.0
    assert np.abs(np.load(out)[:, 0, :4] - known).max() < 1e-6


def test_a_diffusers_model_edits_alike(tmp_path: Path) -> None:
    """The same requests on a mounted diffusers DDPM directory (UNet2DModel + DDPMScheduler config)."""
    from tests.test_reverse_chain import _save_diffusers_dir

    directory = _save_diffusers_dir(tmp_path, {"num_train_timesteps": 40, "beta_schedule": "linear", "clip_sample": True})
    with app_client(directory) as c:
        wait_ready(c)
        inpainted = c.post("/generate", json={"seed": 3, "steps": 6, "sampler": "ddim", "image": _png(DIGIT), "mask": MASK,
                                              "jump_length": 2, "jump_n_sample": 2})  # fmt: skip
        assert inpainted.status_code == 200, inpainted.text
        assert np.array_equal(_pixels(inpainted.json()["images"][0])[:4], DIGIT[:4])
        varied = c.post("/generate", json={"seed": 3, "steps": 6, "image": _png(DIGIT), "strength": 0.5})
        assert varied.status_code == 200 and varied.json()["strength"] == 0.5


def test_a_class_conditional_model_inpaints_towards_the_label(tmp_path: Path) -> None:
    """An edit of a class-conditional model takes a class label and guidance; the label changes the
    repainted pixels only, and the answer names the class."""
    from tests.tiny_model import TINY_CLASSES, save_tiny_conditional_model

    directory = save_tiny_conditional_model(tmp_path / "cond", num_timesteps=100)
    with app_client(directory) as c:
        wait_ready(c)
        body = {"seed": 2, "steps": 5, "sampler": "ddim", "image": _png(DIGIT), "mask": MASK, "guidance_scale": 2.0}
        answers = [c.post("/generate", json={**body, "class_label": label}).json() for label in TINY_CLASSES[:2]]
    assert [a["class_labels"] for a in answers] == [[TINY_CLASSES[0]], [TINY_CLASSES[1]]]
    first, second = (_pixels(a["images"][0]) for a in answers)
    assert np.array_equal(first[:4], DIGIT[:4]) and np.array_equal(second[:4], DIGIT[:4])
    assert not np.array_equal(first[4:], second[4:])
