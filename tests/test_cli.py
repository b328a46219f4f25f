"""The ``ddpm`` command's conventions: --version, help text and default on every flag of every
subcommand, and ``ddpm serve`` taking every setting as a flag (generated from the one Settings)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from commands.main import build_parser
from ddpm import __version__
from ddpm.finite_images import not_finite_message
from ddpm.shipped_models import MODELS_DIR
from service.settings import Settings
from tests.command_in_process import WITHOUT_TORCH, run_command
from tests.tiny_model import SMALLEST, save_tiny_model


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "commands.main", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"ddpm-serve {__version__}"


def test_every_flag_has_help_that_shows_its_default() -> None:
    subcommands = _subcommands(build_parser())
    assert {"train", "sample", "eval", "train-classifier", "info", "serve", "generate"} <= set(subcommands)
    for name, sub in subcommands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"ddpm {name} {flag} has no help"
            rendered = " ".join(sub._get_formatter()._format_action(action).split())
            # serve's setting flags: pydantic-settings writes '(default: ...)'; elsewhere argparse's suffix or the help's words
            if name == "serve" or action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in rendered.lower(), f"ddpm {name} {flag}: {rendered}"


def test_serve_has_a_flag_for_every_setting() -> None:
    serve = _subcommands(build_parser())["serve"]
    flags = {s for a in serve._actions for s in a.option_strings}
    for field in Settings.model_fields:
        assert "--" + field.replace("_", "-") in flags, field


@pytest.mark.parametrize(("argv", "env", "expect"), [
    (["--max-batch", "3"], {"DDPM_MAX_BATCH": "5"}, {"max_batch": 3}),  # the flag wins
    ([], {"DDPM_MAX_BATCH": "5"}, {"max_batch": 5}),  # the environment where no flag
    (["--no-trust-forwarded-for", "--compile", "off"], {"DDPM_TRUST_FORWARDED_FOR": "1"}, {"trust_forwarded_for": False, "compile": "off"}),
    (["--model", "org/name@v2", "--response-cache-mb", "0"], {}, {"model": "org/name@v2", "response_cache_mb": 0.0}),
])  # fmt: skip
def test_serve_flags_override_the_environment(argv: list[str], env: dict[str, str], expect: dict[str, object],
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from commands.serving_commands import settings_from_args

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_from_args(build_parser().parse_args(["serve", *argv]))
    assert {k: getattr(settings, k) for k in expect} == expect


def test_serve_rejects_a_bad_flag_value_with_the_reason() -> None:
    out = run_command(["serve", "--max-batch", "0"])
    said = "ddpm serve: DDPM_MAX_BATCH / --max-batch: Input should be greater than or equal to 1 (got '0')"  # pydantic's field name before
    assert out.code == 1 and out.stderr.strip() == said, out.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["sample", "-n", "0"], "argument -n: must be >= 1, got 0"),  # a torch traceback before
    (["sample", "--steps", "0"], "argument --steps: must be >= 1, got 0"),  # ran the whole 1000-step chain before
    (["sample", "--seed", "-1"], f"argument --seed: must be in 0..{2**63 - 1}, got -1"),
    (["eval", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["train", "--run-dir", "r", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["serve", "--port", "99999"], "argument --port: must be in 0..65535, got 99999"),  # a bind() OverflowError and a C++ abort
    (["generate", "--retries", "-1"], "argument --retries: must be >= 0, got -1"),
    (["sample", "--sampler", "ddim", "--eta", "2"], "argument --eta: must be in [0, 1], got 2"),  # a ValueError after the load
    (["sample", "--strength", "0"], "argument --strength: must be in (0, 1], got 0"),
    (["sample", "--threads", "100000"], "argument --threads: must be in 0..1024, got 100000"),  # DDPM_THREADS=100000: a segfault
    (["generate", "--eta", "nan"], "argument --eta: must be in [0, 1], got nan"),  # a JSON ValueError traceback before
    (["generate", "--guidance-scale", "inf"], "argument --guidance-scale: must be in [0, 50], got inf"),  # the same
    (["generate", "--timeout", "-1"], "argument --timeout: must be in (0, inf), got -1"),
    (["compile-cache", "-o", "c", "--timeout", "-5"], "argument --timeout: must be in (0, inf), got -5"),  # exit 134 before
    (["train", "--run-dir", "r", "--ema-decay", "-1"], "argument --ema-decay: must be in [0, 1], got -1"),  # trained before
    (["train", "--run-dir", "r", "--lr", "0"], "argument --lr: must be in (0, inf), got 0"),  # trained, its weights unchanged
    (["train", "--run-dir", "r", "--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
    (["train", "--run-dir", "r", "--label-dropout", "1"], "argument --label-dropout: must be in [0, 1), got 1"),
    (["train", "--run-dir", "r", "--channels", "2"], "argument --channels: invalid choice: 2 (choose from 1, 3)"),
    (["train", "--run-dir", "r", "--channel-mult", "1,-2"], "argument --channel-mult: must be positive integers, got -2"),  # torch's
    (["train", "--run-dir", "r", "--attn-resolutions", "7,x"], "argument --attn-resolutions: 'x' is not an integer"),
])  # fmt: skip
def test_a_number_out_of_range_is_refused_by_the_parser_naming_the_flag(argv: list[str], said: str,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    for argv in (["info", "--model", str(tmp_path / "none")], ["sample", "--model", str(tmp_path), "-n", "1", "--steps", "1"]):
        out = run_command(argv)
        assert out.code == 1 and out.stderr.startswith(f"ddpm: --model {argv[2]}: ") and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", [["info"], ["sample", "-o", "grid.png"], ["eval"]])
def test_a_mistyped_model_path_is_refused_before_torch_is_imported(command: list[str], tmp_path: Path) -> None:
    """~3 s of `import torch` on a 2-core CPU before the refusal (and every command after it loads nothing without it)."""
    argv = [command[0], "--model", str(tmp_path / "nope"), *command[1:]]
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"ddpm: --model {tmp_path / 'nope'}: model directory not found" in done.stderr, done.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["-o", "{tmp}/grid.foo"], "ddpm: -o {tmp}/grid.foo: not an image file name"),  # a Pillow traceback after the sampling before
    (["-o", "/proc/no/grid.png"], "ddpm: -o /proc/no/grid.png: [Errno 2]"),  # a FileNotFoundError after the sampling before
    *([(["--device", "cuda"], "ddpm: --device cuda: this torch")] if not torch.cuda.is_available() else []),  # an AssertionError
])  # fmt: skip
def test_ddpm_sample_refuses_what_it_cannot_do_before_it_samples(argv: list[str], said: str, tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = run_command(["sample", "-n", "1", "--steps", "1", "--quiet", *argv])
    assert out.code == 1 and out.stderr.strip().startswith(said.replace("{tmp}", str(tmp_path))), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "wrote" not in out.stderr


@pytest.mark.parametrize(("output", "said"), [
    ("{tmp}/grid.foo", "ddpm generate: -o {tmp}/grid.foo: not an image file name (.png, .npy, .jpg, ...)"),
    ("{tmp}/grid.psd", "ddpm generate: -o {tmp}/grid.psd: not an image file name"),  # Pillow reads .psd, never writes it
    ("/proc/no/grid.png", "ddpm generate: -o /proc/no/grid.png: [Errno 2]"),
])  # fmt: skip
def test_ddpm_generate_checks_its_output_before_it_asks_the_server(output: str, said: str, tmp_path: Path) -> None:
    """Both were found only after the server had made the images (a traceback then): here no server listens, so a check
    made after the request would say it cannot reach it."""
    output, said = output.replace("{tmp}", str(tmp_path)), said.replace("{tmp}", str(tmp_path))
    out = run_command(["generate", "--url", "http://127.0.0.1:9", "--retries", "0", "-o", output])
    assert out.code == 1 and out.stderr.strip().startswith(said), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "reach" not in out.stderr and "queued" not in out.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["--run-dir", "/proc/no/run"], "ddpm train: [Errno 2] No such file or directory: '/proc/no'"),
    (["--run-dir", "{tmp}/run", "--image-size", "27"], "ddpm train: image_size 27 is not divisible by 2^2"),
    # trained without attention before: 5 is no feature-map size of a 28x28 model
    (["--run-dir", "{tmp}/run", "--attn-resolutions", "5"],
     "ddpm train: attn_resolutions [5] are not feature-map sizes of this U-Net (28, 14, 7)"),
    (["--run-dir", "{tmp}/run", "--channel-mult", ""], "ddpm train: channel_mult must be one or more positive integers, got []"),  # trained
])  # fmt: skip
def test_ddpm_train_refuses_a_run_it_cannot_set_up_in_one_line(argv: list[str], said: str, tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = run_command(["train", "--steps", "1", "--quiet", *argv])
    assert out.code == 1 and out.stderr.strip() == said and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_ddpm_train_stops_at_a_diverging_loss_in_one_line(tmp_path: Path) -> None:
    """--lr 1e30: Adam's first step moves every weight by ~1e30 and the second forward overflows. It trained on, NaN, to the
    end and exported a model of NaN weights (served as black squares); now: one line, exit 1, nothing written."""
    out = run_command(["train", "--run-dir", str(tmp_path / "run"), "--steps", "4", "--lr", "1e30", "--warmup-steps", "1", "--quiet"])
    said = out.stderr.strip()
    assert out.code == 1 and "Traceback" not in said, said[-2000:]
    assert re.match(r"ddpm train: training diverged at step 2 \(the loss was (nan|inf)", said), said
    assert said.endswith("start again with a lower --lr")
    assert not (tmp_path / "run" / "state.pt").exists() and not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize(("flags", "attention"), [
    ([], (7,)), (["--image-size", "32"], (8,)), (["--channel-mult", "1,2"], (14,)),
    (["--image-size", "64", "--channel-mult", "1,2,2,2"], (8,)),
    (["--image-size", "32", "--attn-resolutions", "16,8"], (16, 8)), (["--attn-resolutions", ""], ()),
])  # fmt: skip
def test_ddpm_train_puts_attention_at_the_smallest_feature_map_by_default(flags: list[str], attention: tuple[int, ...]) -> None:
    """The default was 7 whatever the size: --image-size 32 (feature maps 32, 16, 8) trained with no attention."""
    from commands.model_commands import unet_config

    assert unet_config(build_parser().parse_args(["train", "--run-dir", "r", *flags])).attn_resolutions == attention


def test_ddpm_sample_refuses_to_write_images_that_ended_in_nan(tmp_path: Path) -> None:
    """Weights that are finite but overflow every forward (x 1e38): the chain ends in NaN, which a PNG showed as black and
    an .npy kept; now one line naming the images, exit 1, nothing written."""
    from safetensors.torch import load_file, save_file

    model = save_tiny_model(tmp_path / "m")
    state = load_file(model / "model.safetensors")
    save_file({**state, "conv_in.weight": state["conv_in.weight"] * 1e38}, model / "model.safetensors")
    for output in ("x.png", "x.npy"):
        out = run_command(["sample", "--model", str(model), "-n", "3", "--first-image", "4", "--steps", "2", "--quiet", "-o",
                           str(tmp_path / output)])  # fmt: skip
        assert out.code == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip() == (f"ddpm sample: {not_finite_message([4, 5, 6])}; nothing written to {tmp_path / output}")
        assert not (tmp_path / output).exists()
    # ddpm eval measured them (FD of NaN features) and could record that into the card: the shipped model made to overflow
    shipped = tmp_path / "shipped"
    shutil.copytree(MODELS_DIR / "mnist-28", shipped)
    state = load_file(shipped / "model.safetensors")
    save_file({**state, "conv_in.weight": state["conv_in.weight"] * 1e37}, shipped / "model.safetensors")
    out = run_command(["eval", "--model", str(shipped), "-n", "20", "--steps", "2", "--quiet", "--report", str(tmp_path / "q.json")])
    assert out.code == 1 and out.stderr.strip().endswith("or weights that diverged; nothing measured or recorded"), out.stderr[-2000:]
    assert not (tmp_path / "q.json").exists()


def test_out_of_memory_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A model whose weights fit but whose images do not (a one-level U-Net's config says 10^6 x 10^6 pixels): torch's
    allocator raised through a traceback from the FLOP count (info) or the chain (sample)."""
    model = save_tiny_model(tmp_path / "wide", config=SMALLEST)
    config = json.loads((model / "config.json").read_text())
    config["unet"]["image_size"], config["image_shape"] = 1_000_000, [1, 1_000_000, 1_000_000]
    (model / "config.json").write_text(json.dumps(config))
    sample = ["sample", "-n", "1", "--steps", "1", "--quiet", "-o", str(tmp_path / "x.png")]
    for argv, hint in ((["info"], ""), (sample, " (a smaller --batch-size)")):
        out = run_command([*argv, "--model", str(model)])
        said = out.stderr.strip()
        assert out.code == 1 and said.startswith(f"ddpm {argv[0]}: out of memory (") and "Traceback" not in said, said[-2000:]
        assert "4000000000000 bytes" in said and said.endswith(f"ask for less at once{hint} or use a larger machine")


def test_ddpm_sample_first_image_is_image_k_of_the_seed(tmp_path: Path) -> None:
    """--first-image k: images k.. of the seed, as in a run from image 0 (up to the U-Net's batched rounding)."""
    run = [sys.executable, "-m", "commands.main", "sample", "--seed", "5", "--steps", "2", "--sampler", "ddim", "--precision", "fp32",
           "--quiet"]  # fmt: skip
    for argv in (["-n", "3", "-o", str(tmp_path / "all.npy")], ["-n", "1", "--first-image", "2", "-o", str(tmp_path / "third.npy")]):
        done = subprocess.run([*run, *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    every, third = np.load(tmp_path / "all.npy"), np.load(tmp_path / "third.npy")
    assert np.abs(third[0] - every[2]).max() <= 1e-4 and np.abs(third[0] - every[1]).max() > 0.05


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C during ``ddpm sample`` printed the KeyboardInterrupt's traceback from inside torch (compile or U-Net);
    every command now says it was interrupted, exit 130 (``ddpm train`` and ``distill`` save first, on their own)."""
    import signal
    import time

    log = tmp_path / "err.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "commands.main", "sample", "-n", "2", "--steps", "1000", "--compile", "off",
                                 "-o", str(tmp_path / "x.png")], stderr=err, stdout=subprocess.DEVNULL)  # fmt: skip
        end = time.monotonic() + 120
        while "sample:" not in log.read_text():  # the bar: the chain runs
            assert time.monotonic() < end and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    said = log.read_text()
    assert code == 130 and said.rstrip().endswith("ddpm sample: interrupted") and "Traceback" not in said, said[-2000:]
    assert not (tmp_path / "x.png").exists()


def test_a_training_run_whose_terminal_hangs_up_saves_and_stops(tmp_path: Path) -> None:
    """SIGHUP (an SSH connection dropped, the terminal closed) killed ``ddpm train`` at once: every step since the last
    checkpoint lost (measured: exit -1, no state.pt after 12 s of training). Now it saves and stops as SIGTERM does, its
    output, which went to the terminal that is gone, sent to /dev/null (a write there fails: EIO)."""
    import os
    import pty
    import signal
    import time

    master, terminal = pty.openpty()
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--steps", "100000", "--batch-size", "4", "--base-channels", "8", "--channel-mult", "1",
            "--num-timesteps", "50", "--checkpoint-every", "20", "--sample-every", "100000"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "commands.main", *argv], stdin=terminal, stdout=terminal, stderr=terminal,
                            start_new_session=True)  # fmt: skip
    os.close(terminal)
    try:
        end = time.monotonic() + 120
        while not (run / "state.pt").exists():  # the first checkpoint: it trains
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        os.close(master)  # the terminal is gone: a write to it fails from here on
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 0, code
    state = torch.load(run / "state.pt", weights_only=False)
    assert state["step"] >= 20 and (run / "model" / "model.safetensors").exists()


def test_a_training_run_under_nohup_keeps_its_hangup_ignored() -> None:
    """``nohup ddpm train ... &``: the run's stop handlers replaced nohup's ignored SIGHUP, so closing the terminal saved
    and stopped the run nohup was asked to keep going. A signal ignored from the start stays ignored; the others stop
    it as before."""
    import signal

    from ddpm.train import StopFlag

    before, term = signal.signal(signal.SIGHUP, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)  # as nohup leaves SIGHUP
    try:
        stop = StopFlag()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        stop.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == term
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize(("argv", "said"), [
    (["eval", "-n", "1", "--steps", "1", "--report", "/proc/no/r.json"], "ddpm: --report /proc/no/r.json: [Errno 2]"),
    (["eval", "-n", "1", "--steps", "1", "--classifier", "{tmp}/none"], "ddpm: --classifier {tmp}/none: no digit classifier at"),
    (["distill", "--run-dir", "/proc/no/d"], "ddpm distill: --run-dir /proc/no/d: [Errno 2]"),
    (["distill", "--run-dir", "{tmp}/d", "--eval-n", "1"], "ddpm distill: --eval-n 1: n must be in 2..500"),  # after a round's training
    (["distill", "--run-dir", "{tmp}/d", "--teacher-steps", "2048", "--student-steps", "1"],
     "ddpm distill: --teacher-steps 2048: the teacher has T = 1000 timesteps"),  # "steps must be in 1..1000", no flag named
    (["train-classifier", "--output", "/proc/no/c"], "ddpm train-classifier: --output /proc/no/c: [Errno 2]"),
    # the shipped classifier, replaced by whatever this run trained (--epochs 1 included): every recorded FD then moved
    (["train-classifier"], f"ddpm train-classifier: --output {MODELS_DIR / 'digit-classifier'} holds a classifier already"),
    # evaluated first, then a traceback (below: a diffusers directory, which evaluates but has no card to record into)
    (["eval", "-n", "2", "--steps", "1", "--record", "--model", "{tmp}"], "ddpm: --record: no config.json in model directory {tmp}"),
    (["eval", "-n", "501", "--steps", "1"], "ddpm: -n 501: n must be in 2..500 (two disjoint halves of the held-out digits)"),  # sampled
    (["eval", "-n", "3", "--steps", "1", "--model", str(MODELS_DIR / "mnist-28-cond"), "--class-label", "1,2,2"],
     "ddpm: -n 3: a class's FD needs two or more of its images: class 1 has one"),  # scipy's sqrtm traceback after the sampling
])  # fmt: skip
def test_the_other_commands_refuse_an_output_they_cannot_write_before_the_work(argv: list[str], said: str, tmp_path: Path) -> None:
    """Tracebacks after the evaluation (--report), or at once (distill, a missing classifier); train-classifier trained
    its epochs first."""
    argv, said = [a.replace("{tmp}", str(tmp_path)) for a in argv], said.replace("{tmp}", str(tmp_path))
    out = run_command(argv)
    assert out.code == 1 and out.stderr.strip().startswith(said) and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_eval_record_refuses_a_model_without_a_card_before_it_evaluates(tmp_path: Path) -> None:
    """A diffusers directory evaluates (the sampler loads it), and --record then failed in record_quality, a traceback
    after the whole evaluation: now refused first, the evaluation's report never printed."""
    from tests.test_reverse_chain import _save_diffusers_dir

    model = _save_diffusers_dir(tmp_path, {"num_train_timesteps": 100})
    argv = ["eval", "-n", "2", "--steps", "1", "--quiet", "--model", str(model)]  # it evaluates without --record (20 s here)
    out = run_command([*argv, "--record"])
    assert out.code == 1 and out.stderr.strip().startswith(f"ddpm: --record: no config.json in model directory {model}")
    assert out.stdout == "" and "Traceback" not in out.stderr and not (model / "config.json").exists()


def test_eval_record_refuses_to_give_weights_it_did_not_measure_their_quality(tmp_path: Path, tiny_unet: Any,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A training run exporting into the model directory while ``ddpm eval --record`` samples: the report is printed
    (it is of the weights loaded), not written onto the card of the weights there now; exit 1 saying so."""
    import commands.model_commands as model_commands
    from ddpm.checkpoint import ModelCard, read_card, save_model
    from tests.tiny_model import TINY

    model = save_model(tmp_path / "m", tiny_unet, ModelCard(unet=TINY, training={"steps": 3}))
    sample = model_commands.sample_images

    def sample_while_a_run_exports(*args: Any, **kwargs: Any) -> Any:
        out = sample(*args, **kwargs)
        with torch.no_grad():
            next(tiny_unet.parameters()).add_(1.0)
        save_model(model, tiny_unet, ModelCard(unet=TINY, training={"steps": 4}))  # the run's next checkpoint
        return out

    monkeypatch.setattr(model_commands, "sample_images", sample_while_a_run_exports)
    out = run_command(["eval", "-n", "2", "--steps", "1", "--quiet", "--record", "--model", str(model)])
    assert out.code == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().startswith(f"ddpm: --record: {model}/model.safetensors changed while it was evaluated"), out.stderr
    assert json.loads(out.stdout)["steps"] == 1  # the report, printed
    assert read_card(model).quality == {} and read_card(model).training == {"steps": 4}


FULL_DISK_OUTPUTS = [("sample", "-o", "out.npy"), ("sample", "-o", "out.png"), ("sample", "-o", "out.jpg"), ("eval", "--grid", "grid.png")]


@pytest.mark.parametrize(("command", "flag", "name"), FULL_DISK_OUTPUTS)
def test_an_output_that_fills_the_disk_keeps_the_file_there_before(command: str, flag: str, name: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``ddpm sample -o`` on a full disk (a 100 KiB tmpfs, measured) left a truncated .npy in place of the one there before,
    saying "50176 requested and 25568 written", and an empty PNG: now the file there before stays, nothing else is
    left, and the line says the space left. ``ddpm eval``'s --grid and --report and ``ddpm generate -o`` write alike."""
    import errno
    import os

    from PIL import Image

    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    out = tmp_path / "o" / name
    out.parent.mkdir()
    out.write_bytes(b"the images written before")

    def array_fills_up(f: Any, *args: object, **kwargs: object) -> None:  # as a full disk answers: part written, then ENOSPC
        f.write(b"half an array")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def picture_fills_up(self: Image.Image, fp: Any, *args: object, **kwargs: object) -> None:
        with open(fp, "wb") as f:
            f.write(b"half a picture")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np.lib.format, "write_array", array_fills_up)
    monkeypatch.setattr(Image.Image, "save", picture_fills_up)
    ran = run_command([command, "--model", str(model), "-n", "2", "--steps", "1", "--quiet", flag, str(out)])
    assert ran.code == 1, ran.stderr
    assert ran.stderr.strip().startswith(f"ddpm: {flag} {out}: could not write {out} (OSError: [Errno 28] No space left on device; ")
    assert "MiB free there)" in ran.stderr and "Traceback" not in ran.stderr
    assert out.read_bytes() == b"the images written before" and [p.name for p in out.parent.iterdir()] == [name]


def test_an_output_name_that_is_a_folder_is_refused_before_the_work(tmp_path: Path) -> None:
    """A folder named grid.png: "could not write ... Is a directory" after the sampling (an evaluation's minutes)."""
    (tmp_path / "grid.png").mkdir()
    out = run_command(["sample", "-n", "1", "--steps", "1", "--quiet", "-o", str(tmp_path / "grid.png")])
    assert out.code == 1 and out.stderr.strip() == f"ddpm: -o {tmp_path}/grid.png: a folder is there; name a file in it, or another file"
    out = run_command(["eval", "-n", "2", "--steps", "1", "--quiet", "--report", str(tmp_path)])
    assert out.code == 1 and out.stderr.strip().startswith(f"ddpm: --report {tmp_path}: a folder is there")


def test_an_output_through_a_symbolic_link_writes_the_links_file(tmp_path: Path) -> None:
    """The writer's rename replaced the link itself with a plain file and left the file it pointed at as it was (``>``,
    Pillow and numpy write through a link). A name of 250 bytes, legal, failed at the end: its temporary name was longer
    than the file system's 255."""
    from PIL import Image

    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    (tmp_path / "published").mkdir()
    target = tmp_path / "published" / "latest.png"
    target.write_bytes(b"yesterday's")
    (tmp_path / "latest.png").symlink_to("published/latest.png")
    long_name = tmp_path / ("g" * 246 + ".png")
    for output in (tmp_path / "latest.png", long_name):
        out = run_command(["sample", "--model", str(model), "-n", "2", "--steps", "1", "--quiet", "-o", str(output)])
        assert out.code == 0, out.stderr[-2000:]
    assert (tmp_path / "latest.png").is_symlink() and Image.open(target).size == Image.open(long_name).size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny", "published", "latest.png", long_name.name])
