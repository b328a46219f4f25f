"""What a process inherits and a user does not think of: a locale whose encoding is not UTF-8 (a legacy system's
POSIX locale, ``LC_ALL=C`` with ``PYTHONUTF8=0``) and a working directory that was removed. Real processes, their
environment set as such a shell leaves it."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Python reads files, command lines and names in the locale's encoding: here ASCII (the coercion to C.UTF-8 and the
# UTF-8 mode, which a C locale would otherwise get, turned off as a system without C.UTF-8 has them)
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}

SERVED_UNDER_ASCII = """
import json, os, sys, tempfile
from pathlib import Path
from commands.main import main
from tests.app_client import app_client, wait_ready
from tests.tiny_model import save_tiny_conditional_model
assert sys.getfilesystemencoding() == "ascii"
model = save_tiny_conditional_model(Path(tempfile.mkdtemp()) / "m", num_timesteps=50)
card = json.loads((model / "config.json").read_bytes())
card["classes"] = ["caf\\u00e9", "\\u00e9t\\u00e9", "fox"]
(model / "config.json").write_bytes(json.dumps(card, ensure_ascii=False).encode())  # a card edited by hand, in UTF-8
out = {}
with app_client(model, compile="off", precision="fp32") as c:
    wait_ready(c)
    page = c.get("/")
    out["page"] = [page.status_code, "<html" in page.text.lower()]
    out["classes"] = c.get("/info").json()["classes"]
    by_name = c.post("/generate", json={"seed": 1, "steps": 2, "class_label": "\\u00e9t\\u00e9"})
    out["by_name"] = [by_name.status_code, by_name.json().get("class_labels")]
typed = os.fsdecode("\\u00e9t\\u00e9".encode())  # argv's bytes as this locale decodes them: lone surrogates
png = str(Path(tempfile.mkdtemp()) / "x.png")
out["sample"] = main(["sample", "--model", str(model), "--class-label", typed, "-n", "1", "--steps", "2", "-o", png])
print(json.dumps(out))
"""


def test_a_locale_that_is_not_utf8_serves_the_page_and_reads_utf8_files() -> None:
    """Under an ASCII locale the web page was a 500 (``GET /``: its UTF-8 HTML read in the locale's encoding), a model
    card holding a name in UTF-8 refused the model ("model failed to load"), and ``ddpm sample --class-label été`` was
    "unknown class '\\udcc3\\udca9t\\udcc3\\udca9'" (Python's hold of argv's bytes). Every file the project reads or writes is
    UTF-8 now, whatever the locale (``test_package_structure`` finds a read or write without an encoding)."""
    env = {**os.environ, **ASCII_LOCALE, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SERVED_UNDER_ASCII], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out == {"page": [200, True], "classes": ["café", "été", "fox"], "by_name": [200, ["été"]], "sample": 0}


def test_a_typed_name_is_read_as_utf8_where_the_locale_could_not() -> None:
    """``argument_text``: argv's bytes held as lone surrogates read as UTF-8; bytes that are not UTF-8 (a Latin-1
    terminal's "été") become the escapes a card holds for such a folder's name; text that decoded stays as it is."""
    from commands.argument_types import argument_text

    assert argument_text("\udcc3\udca9t\udcc3\udca9") == "été"
    assert argument_text("\udce9t\udce9") == "\\xe9t\\xe9"
    assert argument_text("été") == "été" and argument_text("7") == "7"


def test_a_command_in_a_removed_directory_says_so(tmp_path: Path) -> None:
    """A shell standing in a folder another shell removed (and made again): ``ddpm sample`` ended in "Intel oneMKL FATAL
    ERROR: Cannot load .../libtorch_cpu.so", exit 2, from ``import torch``. Now one line, exit 1, naming the way back."""
    gone = tmp_path / "build"
    gone.mkdir()
    code = "import sys\nfrom commands.main import main\nsys.exit(main(sys.argv[1:]))"
    script = f'cd "{gone}" && rmdir "{gone}" && mkdir "{gone}" && exec "{sys.executable}" -c "$0" sample -n 1 -o x.png'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PWD": str(gone)}
    done = subprocess.run(["sh", "-c", script, code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    said = f'ddpm sample: the current directory was removed: cd to a folder that exists (cd "{gone}" where it was made again)'
    assert done.stderr.strip() == said
    assert not (gone / "x.png").exists()


def test_an_inductor_cache_folder_that_cannot_be_made_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``TORCHINDUCTOR_CACHE_DIR`` naming a folder that cannot be made: ``ddpm sample`` was a torch traceback from building
    the U-Net and ``ddpm serve`` "model failed to load: FileNotFoundError" of a model that was fine. One line naming the
    variable now, before any work; the client, which compiles nothing, is not refused for it."""
    from tests.command_in_process import run_command
    from tests.tiny_model import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made, even as root
    sample = ["sample", "--model", str(model), "-n", "1", "--steps", "2", "-o", str(tmp_path / "x.png")]
    for argv in (sample, ["serve", "--model", str(model)]):
        ran = run_command(argv)
        assert ran.code == 1 and ran.stderr.strip() == (
            f"ddpm {argv[0]}: TORCHINDUCTOR_CACHE_DIR={blocker / 'cache'} cannot be made (Not a directory): torch keeps its "
            "compiled graphs there; point it at a writable folder, or unset it"), ran
    assert not (tmp_path / "x.png").exists()
    client = run_command(["generate", "--url", "http://127.0.0.1:9", "--retries", "0", "-o", str(tmp_path / "y.png")])
    assert client.code == 1 and "cannot reach http://127.0.0.1:9" in client.stderr, client


def test_a_file_size_limit_is_named_where_a_write_ran_into_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``ulimit -f`` a write stops short (Python ignores SIGXFSZ: EFBIG): the message said "70535.7 MiB free there"
    and a training run's advice was "free space and start again", neither of which could help (measured). The limit is
    named now, and the advice is to raise it."""
    from ddpm import free_space
    from ddpm.train import resumable
    from tests.tiny_model import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    out = tmp_path / "big.npy"  # 512 images of 8x8 floats: 128 KiB and more, past a 100 KiB limit
    argv = [sys.executable, "-m", "commands.main", "sample", "--model", str(model), "-n", "512", "--steps", "1", "--quiet", "-o", str(out)]
    limit = (100 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1])  # as `ulimit -f 100` in bash (dash counts 512 bytes)
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit))  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().endswith("MiB free there; files are limited to 100 KiB (ulimit -f))"), done.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tiny"]
    monkeypatch.setattr(free_space, "file_size_limit", lambda: 51_200)
    assert resumable(tmp_path, None).endswith("raise the file-size limit (ulimit -f) or free space and start again")
    monkeypatch.setattr(free_space, "file_size_limit", lambda: None)
    assert resumable(tmp_path, "step 10").endswith("whole: free space and run the same command to resume from it")


def test_an_address_space_limit_is_said_before_torch_loads_and_in_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``ulimit -v`` 600 MB glibc aborted while torch loaded (exit 127, no word from us), and at 700 and 900 MB a
    convolution ended in "RuntimeError: could not create a primitive" as a traceback (measured: commands/address_space.py).
    A command that loads torch now says the limit first; a failure under it is one line naming it; the client does not
    warn (it loads no torch)."""
    from commands import address_space
    from commands.main import out_of_memory

    argv = [sys.executable, "-m", "commands.main", "sample", "-n", "1", "--steps", "1", "--quiet", "-o", "/proc/x/grid.png"]
    for limit in (600 * 2**20, 900 * 2**20):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda limit=limit: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))  # fmt: skip
        first = done.stderr.splitlines()[0] if done.stderr else ""
        assert first.startswith(f"ddpm sample: the address-space limit (ulimit -v) of {limit >> 20} MiB is small for torch"), done.stderr
        assert "Traceback" not in done.stderr and done.returncode != 0, done.stderr
    client = [sys.executable, "-m", "commands.main", "generate", "--url", "http://127.0.0.1:9", "--retries", "0", "-o", "/proc/x/y.png"]
    done = subprocess.run(client, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (600 * 2**20, 600 * 2**20)))  # fmt: skip
    assert "address-space limit" not in done.stderr and done.returncode == 1, done.stderr
    monkeypatch.setattr(address_space, "address_space_limit", lambda: 900 * 2**20)
    import commands.main as main_module

    monkeypatch.setattr(main_module, "address_space_limit", lambda: 900 * 2**20)
    assert out_of_memory(RuntimeError("could not create a primitive"))  # oneDNN's refused scratch memory, under a limit
    monkeypatch.setattr(main_module, "address_space_limit", lambda: None)
    assert not out_of_memory(RuntimeError("could not create a primitive"))  # without one: not called memory
