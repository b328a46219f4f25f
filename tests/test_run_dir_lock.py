"""One run at a time in a run directory (``ddpm/run_dir_lock.py``).

Before it, ``ddpm train`` started twice on one run directory trained twice to the end, both exiting 0, each writing its
checkpoints over the other's (measured 2026-12-07: two 200-step runs, one ``state.pt`` at the end, twice the CPU)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm.run_dir_lock import LOCK_NAME, RunDirInUse, held
from tests.command_in_process import run_command

TINY_TRAIN = ["--steps", "2", "--batch-size", "2", "--base-channels", "8", "--channel-mult", "1", "--num-timesteps", "50",
              "--warmup-steps", "1", "--quiet"]  # fmt: skip


@pytest.mark.parametrize("command", [["train", *TINY_TRAIN], ["distill", "--quiet"]])
def test_a_second_run_in_a_held_directory_is_refused_at_once_naming_the_first(command: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with held(run_dir, "ddpm train --run-dir run --steps 20000"):
        out = run_command([command[0], "--run-dir", str(run_dir), *command[1:]])
    assert out.code == 1
    said = out.stderr.strip()
    assert said.startswith(f"ddpm {command[0]}: {run_dir} is in use by another run (pid {os.getpid()}, since "), said
    assert "ddpm train --run-dir run --steps 20000" in said and "\n" not in said
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # refused before any work: nothing written


def test_the_lock_goes_with_its_holder_however_it_ends(tmp_path: Path) -> None:
    """A holder killed with SIGKILL leaves the file but no lock: the next run goes on (and records itself)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ddpm.run_dir_lock import held\n"
                               f"with held({str(tmp_path)!r}, 'ddpm train holder'):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirInUse, match=rf"pid {holder.pid}, since .*: ddpm train holder\)"):
            with held(tmp_path, "ddpm train second"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with held(tmp_path, "ddpm train third"):
        assert '"command": "ddpm train third"' in (tmp_path / LOCK_NAME).read_text()
    with held(tmp_path, "ddpm train fourth"):  # and released at the block's end
        pass


def test_the_run_that_finished_holds_nothing_and_the_next_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_command(["train", "--run-dir", str(run_dir), *TINY_TRAIN])
    assert first.code == 0, first.stderr
    again = run_command(["train", "--run-dir", str(run_dir), *TINY_TRAIN])
    assert again.code == 0 and "nothing to train" in again.stderr, again.stderr


@pytest.mark.parametrize("where, error", [("open", errno.EROFS), ("flock", errno.ENOLCK)])
def test_a_directory_that_cannot_be_locked_is_used_without_a_lock(where: str, error: int, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A read-only run directory (a finished run looked at) or a file system without flock: as before the lock."""
    import fcntl

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os if where == "open" else fcntl, where, refuse)
    started = time.monotonic()
    with held(tmp_path, "ddpm train"):
        ran = True
    assert ran and time.monotonic() - started < 1
