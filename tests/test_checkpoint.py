"""A model directory round-trips (weights, config), and a missing, truncated, mismatched or malformed one
is refused with the reason (a hand-edited field, weights that cannot make an image); quality is recorded in its config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import CONFIG, WEIGHTS, CheckpointError, ModelCard, load_model, save_model
from ddpm.model_source import load_model_source
from ddpm.unet import UNet
from tests.tiny_model import TINY


def _saved(tmp_path: Path, model: UNet) -> Path:
    return save_model(tmp_path / "m", model, ModelCard(unet=TINY, training={"steps": 3}))


def test_round_trip(tmp_path: Path, tiny_unet: UNet) -> None:
    directory = _saved(tmp_path, tiny_unet)
    loaded, card = load_model(directory)
    assert card.unet == TINY and card.training == {"steps": 3} and card.image_shape == (1, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), tiny_unet(x, t))
    source = load_model_source(directory)
    assert source.source == "ddpm-serve" and source.schedule.num_timesteps == 1000


def test_missing(tmp_path: Path, tiny_unet: UNet) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent")
    directory = _saved(tmp_path, tiny_unet)
    (directory / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS):
        load_model(directory)


def test_a_run_directory_given_as_the_model_says_where_its_model_is(tmp_path: Path, tiny_unet: UNet) -> None:
    """``--model runs/mine`` (the run, not runs/mine/model) said only that it is no model."""
    save_model(tmp_path / "run" / "model", tiny_unet, ModelCard(unet=TINY))
    with pytest.raises(CheckpointError, match=r"\(a run directory: its model is .*run/model\)$"):
        load_model_source(tmp_path / "run")
    for steps in (2, 1):
        save_model(tmp_path / "distill" / f"steps_{steps}", tiny_unet, ModelCard(unet=TINY))
    with pytest.raises(CheckpointError, match=r"its models are .*distill/steps_1, .*distill/steps_2\)$"):
        load_model_source(tmp_path / "distill")
    with pytest.raises(CheckpointError, match=r"nor a diffusers DDPM directory$"):
        load_model_source(tmp_path)  # holds run/ and distill/, no model of its own: no hint


def test_truncated_weights(tmp_path: Path, tiny_unet: UNet) -> None:
    directory = _saved(tmp_path, tiny_unet)
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(directory)


def test_config_mismatch(tmp_path: Path, tiny_unet: UNet) -> None:
    directory = _saved(tmp_path, tiny_unet)
    cfg = json.loads((directory / CONFIG).read_text())
    cfg["unet"]["base_channels"] = 16
    (directory / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(directory)
    cfg["unet"]["num_res_blocks"] = 2
    cfg["unet"]["base_channels"] = 8
    (directory / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(directory)


@pytest.mark.parametrize("text", ["{not json", '{"format": "other/9"}', '{"format": "ddpm-serve/1", "unet": {}}'])
def test_bad_config(tmp_path: Path, tiny_unet: UNet, text: str) -> None:
    directory = _saved(tmp_path, tiny_unet)
    (directory / CONFIG).write_text(text)
    with pytest.raises(CheckpointError):
        load_model(directory)


def _set(*path: str | int, value: object) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        for key in path[:-1]:
            cfg = cfg[key]
        cfg[path[-1]] = value

    return edit


# A config edited by hand or damaged, and what the refusal must say: each was a traceback (from numpy, torch, nn.Dropout,
# a ZeroDivisionError), a process killed for memory (T = 10^9, 4 million channels) or, worse, accepted (image_shape,
# clip_denoised "yes", NaN or int8 weights: served as black or cast images).
HAND_EDITED = {
    "T of 0": (_set("schedule", "num_timesteps", value=0), "num_timesteps must be an integer in 1..100000, got 0"),
    "T of 10^9": (_set("schedule", "num_timesteps", value=10**9), "num_timesteps must be an integer in 1..100000"),
    "T as a string": (_set("schedule", "num_timesteps", value="1000"), "got '1000'"),
    "beta over 1": (_set("schedule", "params", "beta_end", value=2.0), r"betas must lie in \(0, 1\]; these span 0.0001 .. 2"),
    "NaN beta": (_set("schedule", "params", "beta_start", value=float("nan")), "beta_start must be a finite number, got nan"),
    "unknown parameter": (_set("schedule", "params", "gamma", value=1.0), "takes beta_start and beta_end, not 'gamma'"),
    "unknown kind": (_set("schedule", "kind", value="quadratic"), "schedule kind 'quadratic' is not one of linear, cosine"),
    "4 million channels": (_set("unet", "base_channels", value=4_000_000), r"conv_in.bias has shape \(8,\), config says \(4000000,\)"),
    "0 groups": (_set("unet", "num_groups", value=0), "num_groups must be an integer >= 1, got 0"),
    "size as a string": (_set("unet", "image_size", value="8"), "image_size must be an integer >= 1, got '8'"),
    "channels as a bool": (_set("unet", "in_channels", value=True), "in_channels must be an integer >= 1, got True"),
    "a float multiplier": (_set("unet", "channel_mult", value=[1, 2.5]), r"channel_mult must be a list of integers >= 1, got \[1, 2.5\]"),
    "dropout of 2": (_set("unet", "dropout", value=2.0), r"dropout must be a number in \[0, 1\], got 2.0"),
    "U-Net as a list": (_set("unet", value=[8, 1]), r"unet must be a JSON object, got \[8, 1\]"),
    "no schedule": (lambda cfg: cfg.pop("schedule"), "schedule must be a JSON object, got None"),
    "a learned variance": (_set("variance_type", value="learned"), "variance_type 'learned' is not one of fixed_large, fixed_small"),
    "clip as a string": (_set("clip_denoised", value="yes"), "clip_denoised must be true or false, got 'yes'"),
    "image_shape of 3 channels": (_set("image_shape", value=[3, 8, 8]), r"image_shape \[3, 8, 8\] is not the U-Net's \[1, 8, 8\]"),
}


@pytest.mark.parametrize("edit, says", HAND_EDITED.values(), ids=HAND_EDITED.keys())
def test_a_hand_edited_config_is_refused_naming_the_field(tmp_path: Path, tiny_unet: UNet, edit: Callable[[dict], None], says: str) -> None:
    directory = _saved(tmp_path, tiny_unet)
    cfg = json.loads((directory / CONFIG).read_text())
    edit(cfg)
    (directory / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=says):
        load_model_source(directory)


@pytest.mark.parametrize("damage, says", [
    (lambda t: t.to(torch.int8), "is int8, not floating point"),
    (lambda t: t.masked_fill(torch.rand(t.shape, generator=torch.Generator().manual_seed(0)) < 0.01, float("nan")), "hold NaN or infinity"),
])  # fmt: skip
def test_weights_that_cannot_make_an_image_are_refused(tmp_path: Path, tiny_unet: UNet, damage: Callable, says: str) -> None:
    from safetensors.torch import load_file, save_file

    directory = _saved(tmp_path, tiny_unet)
    state = load_file(directory / WEIGHTS)
    save_file({name: damage(t) for name, t in state.items()}, directory / WEIGHTS)
    with pytest.raises(CheckpointError, match=says):
        load_model_source(directory)
    save_file({**state, "conv_in.bias": torch.full_like(state["conv_in.bias"], float("inf"))}, directory / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"1 tensor holds NaN or infinity \(conv_in.bias first\)"):
        load_model_source(directory)
    save_file({name: t.double() for name, t in state.items()}, directory / WEIGHTS)  # another float type: cast, as before
    assert load_model_source(directory).module.conv_in.bias.dtype == torch.float32


def test_a_write_that_fails_leaves_the_file_as_it_was_and_no_temporary(tmp_path: Path) -> None:
    from ddpm.atomic_file import WriteError
    from ddpm.checkpoint import atomic_write

    target = tmp_path / "config.json"
    target.write_text("before")

    def full_disk(path: str) -> None:
        Path(path).write_text("par", encoding="utf-8")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*config.json \(OSError: \[Errno 28\] No space left on device; [\d.]+ MiB free"):
        atomic_write(target, full_disk)
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(WriteError, match=r"could not write .*gone/config.json \(FileNotFoundError: .*\)$"):  # its directory went away
        atomic_write(tmp_path / "gone" / "config.json", full_disk)


def test_a_file_replaced_keeps_its_permissions(tmp_path: Path) -> None:
    """A private 0600 output written again came back 0644 (readable by anyone): the temporary file's mode was the
    umask's. A new file still gets 0666 less the umask (not mkstemp's 0600, which hid a model from a non-root server)."""
    import os

    from ddpm.atomic_file import write_text

    private = tmp_path / "private.json"
    private.write_text("before")
    private.chmod(0o600)
    write_text(private, "after")
    assert private.read_text() == "after" and private.stat().st_mode & 0o777 == 0o600
    umask = os.umask(0o027)
    try:
        write_text(tmp_path / "new.json", "new")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640


def test_record_quality(tmp_path: Path, tiny_unet: UNet) -> None:
    from ddpm.checkpoint import read_card, record_quality

    directory = _saved(tmp_path, tiny_unet)
    record_quality(directory, {"fd": 12.5, "n": 250})
    card = read_card(directory)
    assert card.quality == {"fd": 12.5, "n": 250} and card.training == {"steps": 3}
    load_model(directory)  # still a valid model


def test_a_quality_measured_on_weights_that_changed_since_is_not_recorded(tmp_path: Path, tiny_unet: UNet) -> None:
    """``ddpm eval --record`` beside a training run that exports into the model directory at each checkpoint: the card
    would give the new weights the old ones' quality."""
    from ddpm.checkpoint import read_card, record_quality
    from ddpm.model_facts import weights_sha256

    directory = _saved(tmp_path, tiny_unet)
    before = weights_sha256(directory)
    record_quality(directory, {"fd": 12.5}, measured=before)  # unchanged: recorded
    assert read_card(directory).quality == {"fd": 12.5}
    with torch.no_grad():
        next(tiny_unet.parameters()).add_(1.0)
    save_model(directory, tiny_unet, ModelCard(unet=TINY, training={"steps": 4}))  # the run's next checkpoint
    with pytest.raises(CheckpointError, match=r"model.safetensors changed while it was evaluated .*not recorded on the card"):
        record_quality(directory, {"fd": 99.0}, measured=before)
    assert read_card(directory).quality == {} and read_card(directory).training == {"steps": 4}


def test_weights_written_between_the_load_and_their_hash_are_loaded_again(tmp_path: Path, tiny_unet: UNet) -> None:
    """A server loading a model directory that a training run exports into: its hash (the fingerprint in ETags and the
    response cache) must name the weights it runs. The run's export lands after the load and before the hash: the
    directory is loaded again, and what is returned runs the weights the hash names."""
    from ddpm.model_facts import weights_sha256
    from ddpm.model_source import LOAD_TRIES, load_unchanged

    directory = _saved(tmp_path, tiny_unet)
    newer = UNet(TINY)
    with torch.no_grad():
        for p in newer.parameters():
            p.add_(0.5)
    exports = []

    def hash_after_an_export(times: int):  # type: ignore[no-untyped-def]
        def measure(model: object) -> str:
            if len(exports) < times:
                exports.append(save_model(directory, newer, ModelCard(unet=TINY, training={"steps": 4 + len(exports)})))
            return weights_sha256(directory)

        return measure

    model, sha = load_unchanged(directory, "cpu", hash_after_an_export(1))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(model.eps_model(x, t), newer(x, t))  # the weights the hash names, not the first load's
    assert sha == weights_sha256(directory) and model.info["training"] == {"steps": 4} and len(exports) == 1
    exports.clear()
    with pytest.raises(CheckpointError, match=rf"changed while it was loaded, {LOAD_TRIES} times over"):
        load_unchanged(directory, "cpu", hash_after_an_export(LOAD_TRIES))
    assert len(exports) == LOAD_TRIES
    model, _ = load_unchanged(directory, "cpu", hash_after_an_export(0))  # still: loaded once, as before


def test_a_model_folder_whose_name_is_not_utf8_loads_and_is_served_under_escapes(tmp_path: Path, tiny_unet: UNet) -> None:
    """A folder named in Latin-1 (b"mn\\xe9ist"): safetensors refused the path ("Path ... is not valid UTF-8", which the
    load reported as a truncated file), and past that the server's every answer naming the model (its folder's name)
    failed to encode, a 500 for each request and for /metrics (measured on a real ``ddpm serve``)."""
    import os

    from tests.app_client import app_client, wait_ready

    directory = Path(os.fsdecode(os.fsencode(tmp_path) + b"/mn\xe9ist"))
    save_model(directory, tiny_unet, ModelCard(unet=TINY, num_timesteps=50))
    module, _ = load_model(directory)
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), tiny_unet.state_dict().values(), strict=True))
    assert load_model_source(directory).name == "mn\\xe9ist"
    with app_client(directory, compile="off", precision="fp32") as c:
        wait_ready(c)
        r = c.post("/generate", json={"seed": 1, "steps": 2})
        assert r.status_code == 200 and r.json()["model"] == "mn\\xe9ist", r.text
        assert c.get("/v1/models").json()["data"][0]["id"] == "mn\\xe9ist"
        assert 'model="mn\\\\xe9ist"' in c.get("/metrics").text
