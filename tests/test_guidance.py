"""Classifier-free guidance: the U-Net's labels, the guided eps against its formula, one U-Net call per
iteration with 2 rows per guided sample, and the server's class-conditional requests against the
offline sampler (the reproducibility contract extended to the label and the scale)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.chain import ChainSpec
from ddpm.checkpoint import CheckpointError, ModelCard, load_model, read_card
from ddpm.guidance import fixed_guidance, guided_eps, rows_per_call
from ddpm.image_request import ImageRequest
from ddpm.loaded_model import ChainError
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from ddpm.unet import UNet
from kernels.philox import seeds_to_tensor
from service.engine.engine import Engine
from service.engine.job import Job
from tests.app_client import app_client, metric, wait_ready
from tests.command_in_process import run_command
from tests.engine_jobs import wait_done
from tests.tiny_model import TINY, TINY_CLASSES, random_tiny_conditional_unet, save_tiny_conditional_model, save_tiny_model


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_conditional_model(tmp_path_factory.mktemp("m") / "tiny-cond", num_timesteps=100)


def test_conditional_unet_labels() -> None:
    unet = random_tiny_conditional_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900])
    with torch.no_grad():
        null = torch.full((4,), 3)
        assert torch.equal(unet(x, t), unet(x, t, null))  # no labels = the null label
        by_label = [unet(x, t, torch.full((4,), y)) for y in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert (by_label[a] - by_label[b]).abs().max() > 1e-3  # every label, and null, is its own
    plain = UNet(TINY)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, null)
    assert not any("label_emb" in k for k in plain.state_dict())  # unconditional checkpoints are unchanged


def test_guided_eps_is_the_cfg_formula_in_one_call() -> None:
    unet = random_tiny_conditional_unet()
    calls: list[int] = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return unet(x, t, y)

    x, t = torch.randn(5, 1, 8, 8), torch.tensor([10, 20, 30, 40, 50])
    labels = torch.tensor([0, 1, 2, 3, 1])  # 3: the null label
    scales = torch.tensor([0.0, 2.0, 0.5, 0.0, 4.0])
    with torch.no_grad():
        eps = guided_eps(model, x, t, labels, scales, null_label=3)
        cond, uncond = unet(x, t, labels), unet(x, t)
    assert calls == [5 + 3] and rows_per_call(scales) == 8  # one call: 5 rows plus a null copy of the 3 guided ones
    expected = (1 + scales.view(-1, 1, 1, 1)) * cond - scales.view(-1, 1, 1, 1) * uncond
    assert (eps - expected).abs().max() < 1e-5
    assert torch.equal(eps[0], cond[0]) or (eps[0] - cond[0]).abs().max() < 1e-6  # w = 0: the conditional eps
    calls.clear()
    with torch.no_grad():
        guided_eps(model, x, t, labels, torch.zeros(5), null_label=3)
    assert calls == [5]  # nothing guided: no extra rows


def test_checkpoint_records_classes(tmp_path: Path, cond_dir: Path) -> None:
    _module, card = load_model(cond_dir)
    assert card.class_names == TINY_CLASSES and card.unet.num_classes == 3 and card.guidance_scale == 1.5
    model = load_model_source(cond_dir)
    assert model.conditional and model.class_names == TINY_CLASSES
    assert model.labels("dog", 2, None) == ((1, 1), 1.5)  # the card's scale by default
    assert model.labels(["fox", 0], 2, 0.0) == ((2, 0), 0.0)
    assert model.labels(None, 2, None) == (None, 0.0)
    for bad, field in [("wolf", "class_label"), (3, "class_label"), (["cat"], "class_label")]:
        with pytest.raises(ChainError) as err:
            model.labels(bad, 2, None)
        assert err.value.field == field
    with pytest.raises(ChainError, match="needs a class_label"):
        model.labels(None, 1, 2.0)
    with pytest.raises(CheckpointError, match="do not match"):
        ModelCard(unet=card.unet, class_names=["a", "b"])
    plain = load_model_source(save_tiny_model(tmp_path / "plain"))
    with pytest.raises(ChainError, match="unconditional"):
        plain.labels("cat", 1, None)


def _offline(cond_dir: Path, seed: int, labels: list[int], w: float, steps: int, sampler: str) -> torch.Tensor:
    model = load_model_source(cond_dir)
    n = len(labels)
    eps = fixed_guidance(model.eps_model, torch.tensor(labels), torch.full((n,), w), model.num_classes)
    with torch.inference_mode():
        return sample(eps, model.schedule, seeds_to_tensor(image_seeds(seed, n)), model.image_shape, steps=steps, sampler=sampler,
                      variance_type=model.variance_type, clip_denoised=model.clip_denoised)  # fmt: skip


def test_engine_mixes_guided_unguided_and_unconditional_samples(cond_dir: Path) -> None:
    model = load_model_source(cond_dir)
    inner, rows = model.eps_model, []
    model.eps_model = lambda x, t, y: (rows.append(x.shape[0]), inner(x, t, y))[1]  # type: ignore[assignment, misc]
    engine = Engine(model, max_batch=16, max_queue=64)
    engine.start()
    specs = [  # seed, labels, w, steps, sampler
        (1, [0, 1], 2.0, 12, "ddim"),
        (2, [2, 2, 0], 0.0, 10, "dpmsolver++"),  # conditional, unguided
        (3, None, 0.0, 8, "ddpm"),  # unconditional (null label)
        (4, [1], 4.0, 12, "sde-dpmsolver++"),
    ]
    try:
        jobs = []
        for seed, labels, w, steps, sampler in specs:
            asked = ImageRequest(seed, len(labels or [0]), ChainSpec(steps, sampler), tuple(labels) if labels else None, w)
            job = Job(asked, timeout_s=60)
            jobs.append(engine.submit(job))
            time.sleep(0.005)
        wait_done(*jobs)
    finally:
        engine.stop()
    assert max(rows) >= 7 + 3  # at some iteration 7 samples shared one call, 3 of them guided (2 rows each)
    for job, (seed, labels, w, steps, sampler) in zip(jobs, specs, strict=True):
        assert job.error is None and job.images is not None
        offline = _offline(cond_dir, seed, labels if labels else [3], w, steps, sampler)
        # batched-kernel rounding (the batch differs from the offline one), amplified up to (1 + w) by guidance
        assert (job.images - offline).abs().max() < 1e-4, (seed, labels, w)
    # the label and the scale matter: the same seed with another label or scale is another image
    a = _offline(cond_dir, 1, [0], 2.0, 12, "ddim")
    assert (a - _offline(cond_dir, 1, [1], 2.0, 12, "ddim")).abs().max() > 1e-2
    assert (a - _offline(cond_dir, 1, [0], 0.0, 12, "ddim")).abs().max() > 1e-2


def test_text_labels_name_a_class_first_then_digits_index_one() -> None:
    """A model trained on folders 3/, 5/, 7/ has classes 0, 1, 2 named "3", "5", "7". `--class-label 5` (and a form
    field "5") was read as index 5 (unknown), and "1" as index 1: the class named "5", silently. Text names a class;
    digits index one only where the classes are not named by numbers."""
    from types import SimpleNamespace

    from ddpm.loaded_model import LoadedModel
    from ddpm.names import parse_class_labels

    model = SimpleNamespace(conditional=True, class_names=["3", "5", "7"], num_classes=3, guidance_scale=None)

    def labels(text: str, n: int = 1) -> tuple[int, ...] | None:
        return LoadedModel.labels(model, parse_class_labels(text), n, None)[0]  # type: ignore[arg-type]

    assert labels("5") == (1,) and labels("3,7", 2) == (0, 2)
    assert LoadedModel.labels(model, 2, 1, None)[0] == (2,)  # type: ignore[arg-type]  # a JSON number is an index
    for text in ("9", "1"):  # classes named by numbers: digits are names only ("1" was the class named "5")
        with pytest.raises(ChainError, match=f"unknown class '{text}'"):
            labels(text)
    named = SimpleNamespace(conditional=True, class_names=["cat", "dog"], num_classes=2, guidance_scale=None)
    assert LoadedModel.labels(named, parse_class_labels("1,dog"), 2, None)[0] == (1, 1)  # type: ignore[arg-type]
    digits = SimpleNamespace(conditional=True, class_names=[str(d) for d in range(10)], num_classes=10, guidance_scale=None)
    assert LoadedModel.labels(digits, parse_class_labels("7"), 1, None)[0] == (7,)  # type: ignore[arg-type]  # MNIST: the same
    # "balanced": image k = first.. of the seed asks for class k mod the number of classes, unless a class is so named
    assert LoadedModel.labels(named, "balanced", 3, None, first=5)[0] == (1, 0, 1)  # type: ignore[arg-type]
    assert LoadedModel.labels(digits, "balanced", 2, None)[0] == (0, 1)  # type: ignore[arg-type]
    odd = SimpleNamespace(conditional=True, class_names=["plain", "balanced"], num_classes=2, guidance_scale=None)
    assert LoadedModel.labels(odd, "balanced", 2, None, first=4)[0] == (1, 1)  # type: ignore[arg-type]
    with pytest.raises(ChainError, match="unknown class 'balanced'"):
        LoadedModel.labels(named, ["balanced", "cat"], 2, None)  # type: ignore[arg-type]


def test_http_class_conditional_requests(cond_dir: Path) -> None:
    body = {"seed": 5, "batch_size": 3, "steps": 10, "sampler": "ddim", "timestep_spacing": "linspace", "class_label": ["fox", 0, "dog"],
            "guidance_scale": 3.0}  # fmt: skip
    with app_client(cond_dir, compile="off", precision="fp32") as c:
        wait_ready(c)
        info = c.get("/info").json()
        assert info["classes"] == TINY_CLASSES and info["guidance_scale"] == 1.5
        r = c.post("/generate", json=body, headers={"Accept": "application/x-npy"})
        assert r.status_code == 200
        meta = c.post("/generate", json=body).json()
        assert meta["class_labels"] == ["fox", "cat", "dog"] and meta["guidance_scale"] == 3.0 and meta["cached"] is True
        default_w = c.post("/generate", json={"seed": 5, "steps": 10, "class_label": "cat"}).json()
        assert default_w["guidance_scale"] == 1.5 and default_w["class_labels"] == ["cat"]
        for bad, field in [({"class_label": "wolf"}, "class_label"), ({"class_label": [0, 1]}, "class_label"),
                           ({"guidance_scale": 2.0}, "guidance_scale"), ({"class_label": 0, "guidance_scale": -1.0}, "guidance_scale"),
                           ({"class_label": True}, "class_label")]:  # fmt: skip
            r422 = c.post("/generate", json={"seed": 1, "batch_size": 3, **bad})
            assert r422.status_code == 422 and r422.json()["detail"].startswith(field), (bad, r422.text)
        oa = c.post("/v1/images/generations", json={"prompt": "x", "n": 1, "class_label": "dog", "guidance_scale": 0.0, "steps": 4})
        assert oa.status_code == 200 and oa.json()["class_labels"] == ["dog"]
        assert metric(c, 'ddpm_requests_total{code="422"}') == 5
        # guided image-steps (a second U-Net row each): 3 x 10 of the first request and 1 x 10 at the card's 1.5; not the w = 0 one
        assert metric(c, "ddpm_guided_image_steps_total") == 40 and metric(c, "ddpm_image_steps_total") == 44
        # "balanced": image k of the seed asks for class k mod 3, whichever request asks for it (so part of a held answer is a hit)
        balanced = {"seed": 2, "steps": 4, "class_label": "balanced", "guidance_scale": 0.0}
        whole = c.post("/generate", json={**balanced, "batch_size": 6}).json()
        assert whole["class_labels"] == ["cat", "dog", "fox", "cat", "dog", "fox"]
        part = c.post("/generate", json={**balanced, "batch_size": 2, "first_image": 4})
        assert part.json()["class_labels"] == ["dog", "fox"] and part.headers["x-cache"] == "hit"
        assert part.json()["images"] == whole["images"][4:]
        oa = c.post("/v1/images/generations", json={"prompt": "x", "n": 2, "first_image": 1, **balanced})
        assert oa.json()["class_labels"] == ["dog", "fox"] and [d["b64_json"] for d in oa.json()["data"]] == whole["images"][1:3]
    import io

    import numpy as np

    served = torch.from_numpy(np.load(io.BytesIO(r.content))) * 2 - 1
    offline = _offline(cond_dir, 5, [2, 0, 1], 3.0, 10, "ddim").clamp(-1, 1)
    assert (served - offline).abs().max() < 1e-4


def test_class_names_that_are_not_text_are_served_as_escapes(cond_dir: Path, tmp_path: Path) -> None:
    """A model trained on a folder whose class sub-folder has a Latin-1 name: its card held the name as a lone surrogate
    ("\\udce9t\\udce9", Python's hold of the byte), and every answer naming that class, and every 422 listing the
    classes, failed to encode: a 500 (measured with a real ``ddpm train --conditional`` and ``ddpm serve``). The name's
    bytes become escapes, in new cards (the folder's classes) and cards written before."""
    import json
    import os
    import shutil

    from ddpm.data import folder_classes

    model = Path(shutil.copytree(cond_dir, tmp_path / "m"))
    card = json.loads((model / "config.json").read_text())
    card["classes"] = ["cat", "\udce9t\udce9", "\ud800"]  # as json.dumps wrote the folder's name; a surrogate no byte's
    (model / "config.json").write_text(json.dumps(card))
    assert read_card(model).class_names == ["cat", "\\xe9t\\xe9", "\\ud800"]
    with app_client(model, compile="off", precision="fp32") as c:
        wait_ready(c)
        assert c.get("/info").json()["classes"] == ["cat", "\\xe9t\\xe9", "\\ud800"]
        named = c.post("/generate", json={"seed": 1, "steps": 2, "class_label": 1})
        assert named.status_code == 200 and named.json()["class_labels"] == ["\\xe9t\\xe9"], named.text
        by_name = c.post("/generate", json={"seed": 1, "steps": 2, "class_label": "\\xe9t\\xe9"})
        assert by_name.status_code == 200 and by_name.json()["class_labels"] == ["\\xe9t\\xe9"]
        unknown = c.post("/generate", json={"seed": 1, "steps": 2, "class_label": "wolf"})
        assert unknown.status_code == 422 and "this model's classes: cat, \\xe9t\\xe9, \\ud800" in unknown.json()["detail"]
    (tmp_path / "d" / "b").mkdir(parents=True)
    os.mkdir(os.fsencode(tmp_path / "d") + b"/\xe9t\xe9")
    for folder in (tmp_path / "d" / "b", Path(os.fsdecode(os.fsencode(tmp_path / "d") + b"/\xe9t\xe9"))):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "0.png")
    assert folder_classes(tmp_path / "d")[1] == ["b", "\\xe9t\\xe9"]


def test_a_class_name_matches_in_either_unicode_form(cond_dir: Path, tmp_path: Path) -> None:
    """A class folder named on macOS is stored decomposed ("cafe" + U+0301) and its card kept it so: a client typing
    "café" (composed, as keyboards and browsers send) got 422 "unknown class 'café'" for a class the listing showed as
    "café". Each form now names the class; a card holding both forms keeps each exact name its own class; two folders
    that are one name in two forms are refused at training, naming both."""
    import json
    import shutil

    from ddpm.data import folder_classes

    model = Path(shutil.copytree(cond_dir, tmp_path / "m"))
    card = json.loads((model / "config.json").read_text(encoding="utf-8"))
    card["classes"] = ["cafe\u0301", "\u00e9t\u00e9", "fox"]  # decomposed (macOS), composed, plain
    (model / "config.json").write_text(json.dumps(card), encoding="utf-8")
    loaded = load_model_source(model, device="cpu")
    for label, want in [("caf\u00e9", 0), ("cafe\u0301", 0), ("e\u0301te\u0301", 1), ("\u00e9t\u00e9", 1), ("fox", 2), ("2", 2)]:
        assert loaded.labels(label, 1, None)[0] == (want,), label
    with pytest.raises(ChainError, match="unknown class 'cafe'"):
        loaded.labels("cafe", 1, None)
    card["classes"] = ["caf\u00e9", "cafe\u0301", "fox"]  # a card with both: each exact name its own class, no guessing
    (model / "config.json").write_text(json.dumps(card), encoding="utf-8")
    loaded = load_model_source(model, device="cpu")
    assert loaded.labels(["caf\u00e9", "cafe\u0301"], 2, None)[0] == (0, 1)
    for name in ("caf\u00e9", "cafe\u0301", "fox"):
        (tmp_path / "d" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "d" / name / "0.png")
    with pytest.raises(ValueError, match="one name written two ways in Unicode") as refused:
        folder_classes(tmp_path / "d")
    assert "'cafe\\u0301' and 'caf\\xe9'" in str(refused.value)  # ascii(): the two forms told apart on screen


def test_cli_sample_and_eval_take_labels(cond_dir: Path, tmp_path: Path) -> None:
    import json

    import numpy as np

    common = ["--model", str(cond_dir), "--steps", "6", "--sampler", "ddim", "--spacing", "linspace", "--compile", "off",
              "--precision", "fp32", "--quiet"]  # fmt: skip
    out = run_command(["sample", *common, "-n", "3", "--class-label", "fox,0,dog", "--guidance-scale", "2", "-o", str(tmp_path / "x.npy")])
    assert out.code == 0, out.stderr
    offline = (_offline(cond_dir, 0, [2, 0, 1], 2.0, 6, "ddim").clamp(-1, 1) + 1) / 2
    assert np.abs(np.load(tmp_path / "x.npy") - offline.numpy()).max() < 1e-5
    bad = run_command(["sample", *common, "-n", "1", "--class-label", "wolf"])
    assert bad.code != 0 and "--class-label: unknown class 'wolf'" in bad.stderr
    ev = run_command(["eval", *common, "-n", "30", "--class-label", "balanced", "--guidance-scale", "1"])
    assert ev.code == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["guidance_scale"] == 1.0 and 0 <= report["agreement"] <= 1 and set(report["per_class"]) == {"0", "1", "2"}
    assert report["per_class"]["0"]["n"] == 10


def test_balanced_labels_follow_the_seeds_image_index(cond_dir: Path, tmp_path: Path) -> None:
    """``--class-label balanced`` gave image i of the request class i mod K: with --first-image 2, images 2 and 3 of the
    seed got classes 0 and 1, not 2 and 0, so they differed from the same images in a request from image 0."""
    import numpy as np

    common = ["sample", "--model", str(cond_dir), "--steps", "4", "--sampler", "ddim", "--compile", "off", "--precision", "fp32",
              "--quiet", "--class-label", "balanced"]  # fmt: skip
    for flags, name in ((["-n", "4"], "all.npy"), (["-n", "2", "--first-image", "2"], "part.npy")):
        out = run_command([*common, *flags, "-o", str(tmp_path / name)])
        assert out.code == 0, out.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "part.npy") - np.load(tmp_path / "all.npy")[2:]).max() < 1e-4


def _conditional_diffusers_dir(tmp_path: Path, num_class_embeds: int, id2label: dict | None) -> Path:
    import json

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4, num_class_embeds=num_class_embeds)  # fmt: skip
    with torch.no_grad():
        unet.class_embedding.weight.normal_(0, 1.0)
        unet.conv_out.weight.normal_(0, 0.05)
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100, "beta_schedule": "linear", "timestep_spacing": "linspace"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    index = {"_class_name": "DDPMPipeline", **({"id2label": id2label} if id2label is not None else {})}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


def test_class_conditional_diffusers_unet_with_an_unambiguous_mapping(tmp_path: Path) -> None:
    """num_class_embeds = K + 1 and id2label naming K classes (DiT's convention): served conditional, the
    last embedding as the null label; anything else refused with the reason."""
    d = _conditional_diffusers_dir(tmp_path / "ok", 4, {"0": "cat", "1": "dog", "2": "fox"})
    model = load_model_source(d)
    assert model.conditional and model.class_names == ["cat", "dog", "fox"] and model.num_classes == 3
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 60])
    with torch.no_grad():
        direct = model.module(x, t, class_labels=torch.tensor([1, 3])).sample
        assert torch.equal(model.eps_model(x, t, torch.tensor([1, 3])), direct)
        assert torch.equal(model.eps_model(x, t), model.module(x, t, class_labels=torch.tensor([3, 3])).sample)  # null by default
    with app_client(d, compile="off", precision="fp32") as c:
        wait_ready(c)
        body = {"seed": 2, "batch_size": 2, "steps": 8, "sampler": "ddim", "class_label": ["fox", "cat"], "guidance_scale": 2.0}
        r = c.post("/generate", json=body, headers={"Accept": "application/x-npy"})
        assert r.status_code == 200 and c.get("/info").json()["classes"] == ["cat", "dog", "fox"]
    import io

    import numpy as np

    eps = fixed_guidance(model.eps_model, torch.tensor([2, 0]), torch.full((2,), 2.0), 3)
    with torch.inference_mode():
        offline = sample(eps, model.schedule, seeds_to_tensor(image_seeds(2, 2)), model.image_shape, steps=8, sampler="ddim",
                         spacing="linspace", variance_type=model.variance_type, clip_denoised=model.clip_denoised)  # fmt: skip
    assert np.abs(np.load(io.BytesIO(r.content)) - ((offline.clamp(-1, 1) + 1) / 2).numpy()).max() < 1e-4
    for name, embeds, id2label in [("none", 4, None), ("count", 4, {"0": "a", "1": "b"}), ("gap", 3, {"0": "a", "2": "b"})]:
        with pytest.raises(CheckpointError, match=r"num_class_embeds = K \+ 1"):
            load_model_source(_conditional_diffusers_dir(tmp_path / name, embeds, id2label))
