"""A ``ddpm`` command under a shell that closed its standard error (``2>&-``) or whose output's reader went away
(``ddpm info | head -1``): real processes, their descriptors set as the shell leaves them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_model import save_tiny_model

DDPM = [sys.executable, "-m", "commands.main"]


def _close(*fds: int):  # type: ignore[no-untyped-def]
    return lambda: [os.close(fd) for fd in fds]


def test_a_command_whose_standard_error_is_closed_still_does_its_work(tmp_path: Path) -> None:
    """``ddpm sample ... 2>&-`` (and ``ddpm train``) ended with exit 1, no line and no output: Python sets sys.stderr to
    None and the progress bar's first write raised where nothing could print it."""
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    for closed in ((2,), (0, 1, 2)):
        out = tmp_path / f"closed-{len(closed)}.png"
        argv = [*DDPM, "sample", "--model", str(model), "-n", "2", "--steps", "2", "-o", str(out)]
        done = subprocess.run(argv, preexec_fn=_close(*closed), timeout=120)
        assert done.returncode == 0 and out.stat().st_size > 0, closed


def test_a_file_opened_with_standard_error_closed_is_not_where_standard_error_writes(tmp_path: Path) -> None:
    """With descriptor 2 closed the next file opened took it, and whatever wrote to "standard error" (a C library's
    warning) wrote into that file."""
    script = (
        "import os, sys\nfrom commands.standard_streams import open_closed_streams\nopen_closed_streams()\n"
        f"f = open({str(tmp_path / 'data.bin')!r}, 'wb')\nos.write(2, b'a warning')\nprint('warned', file=sys.stderr)\n"
        "f.write(b'data')\nprint(f.fileno(), sys.stderr is not None)\nf.close()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], preexec_fn=_close(2), stdout=subprocess.PIPE, text=True, timeout=60)
    fd, has_stderr = done.stdout.split()
    assert done.returncode == 0 and fd != "2" and has_stderr == "True", done.stdout
    assert (tmp_path / "data.bin").read_bytes() == b"data"


def test_output_whose_reader_went_away_stops_quietly_with_sigpipes_status(tmp_path: Path) -> None:
    """``ddpm info | true``: a BrokenPipeError traceback before; now exit 141 (128 + SIGPIPE) and nothing said, as a C
    tool killed by the signal. The pipe's read end is closed before the command starts, so it is gone at the first write."""
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([*DDPM, "info", "--model", str(model)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr[-2000:])
