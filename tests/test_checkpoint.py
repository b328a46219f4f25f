"""A model directory round-trips (weights, config), and a missing, truncated, mismatched or malformed one
is refused with the reason; quality is recorded in its config."""

from __future__ import annotations

import json
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


def test_record_quality(tmp_path: Path, tiny_unet: UNet) -> None:
    from ddpm.checkpoint import read_card, record_quality

    directory = _saved(tmp_path, tiny_unet)
    record_quality(directory, {"fd": 12.5, "n": 250})
    card = read_card(directory)
    assert card.quality == {"fd": 12.5, "n": 250} and card.training == {"steps": 3}
    load_model(directory)  # still a valid model
