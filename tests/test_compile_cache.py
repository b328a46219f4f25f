"""Compiled graphs that travel (ddpm/compile_cache.py): copied out by `ddpm compile-cache`, loaded by the
next server on the same kind of machine, and never loaded where they were built for another CPU or version;
both on a read-only root with one tmpfs writable, as the container runs (the read-only test of 2026-11-29 joined
this one: each cold-compiled the tiny U-Net on its own, ~115 s apiece on a 2-core CPU)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch

from ddpm import compile_cache
from ddpm.compile_cache import artefact_path, machine_key
from ddpm.inference_compile import cpu_compiler_available
from tests.server_process import ServerProcess
from tests.tiny_model import SMALLEST, save_tiny_model

needs_compiler = pytest.mark.skipif(not cpu_compiler_available(), reason="torch.compile on CPU needs a C++ compiler")


def test_the_key_names_what_compiled_code_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    key = machine_key("cpu", "bf16", "f" * 64)
    assert key["torch"] == torch.__version__ and key["device"] == "cpu" and key["precision"] == "bf16"
    assert key["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    path = artefact_path(Path("/x"), key)
    assert path == artefact_path(Path("/x"), dict(reversed(list(key.items()))))  # order does not matter
    assert key["code"] == compile_cache.code_fingerprint()
    for change in ({"precision": "fp32"}, {"model": "e" * 64}, {"vec_isa": "sve"}, {"torch": "0.0"}, {"code": "0"}):
        assert artefact_path(Path("/x"), {**key, **change}) != path, change
    monkeypatch.setattr(compile_cache, "_vec_isa", lambda: "avx512" if key["vec_isa"] != "avx512" else "avx2")  # another CPU
    assert artefact_path(Path("/x"), machine_key("cpu", "bf16", "f" * 64)) != path


def test_the_code_fingerprint_follows_the_projects_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "somepkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "graph.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(compile_cache, "PACKAGES", ("somepkg", "no_such_package"))
    before = compile_cache.code_fingerprint()
    (package / "notes.txt").write_text("not code")
    assert compile_cache.code_fingerprint() == before
    (package / "sub" / "graph.py").write_text("SCALE = 2\n")  # a traced module changed: other graphs
    assert compile_cache.code_fingerprint() != before


def test_a_copy_built_by_other_code_is_replaced_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept volume across an upgrade: the new code's copy is written beside the old one, which no process of this key
    loads again and which goes; another model's copy, and this model's on another machine, stay."""
    local = tmp_path / "inductor-local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    (local / "fxgraph").mkdir(parents=True)
    key = machine_key("cpu", "fp32", "a" * 64)
    old, other_model, other_machine = {**key, "code": "0" * 20}, {**key, "code": "0" * 20, "model": "b" * 64}, {**key, "vec_isa": "x"}
    kept = [compile_cache.save(tmp_path / "cc", k) for k in (other_model, other_machine)]
    stale = compile_cache.save(tmp_path / "cc", old)
    assert stale is not None and stale.is_dir() and stale != artefact_path(tmp_path / "cc", key)
    assert "built by other code" in compile_cache.load(tmp_path / "cc", key)  # the upgrade: seeded from it, compiles, then
    written = compile_cache.save(tmp_path / "cc", key)
    assert written is not None and written.is_dir() and not stale.exists()
    assert all(path is not None and path.is_dir() for path in kept)


def test_a_loaded_copy_that_failed_is_taken_out_of_the_local_cache_and_replaced(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``drop_loaded`` after a compile failed with a copy loaded (its kernel libraries did not load here): the copy's
    files leave the local cache (what the cache held besides stays), and the compile's own graphs are what ``save``
    then copies out, over the failed copy although it passes its manifest."""
    local = tmp_path / "inductor-local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    key = machine_key("cpu", "fp32", "a" * 64)
    (local / "ab").mkdir(parents=True)
    (local / "ab/cab.main.so").write_bytes(b"a damaged kernel that passes the manifest")
    failed = compile_cache.save(tmp_path / "cc", key)
    assert failed is not None
    shutil.rmtree(local)
    (local / "th").mkdir(parents=True)
    (local / "th/isa.so").write_bytes(b"the key's ISA check, before the load")
    assert compile_cache.drop_loaded() is None  # nothing loaded yet
    assert compile_cache.load(tmp_path / "cc", key).startswith(f"loaded compiled graphs from {failed}")
    assert (local / "ab/cab.main.so").exists()
    assert compile_cache.drop_loaded() == failed
    assert not (local / "ab/cab.main.so").exists() and (local / "th/isa.so").exists()
    assert compile_cache.drop_loaded() is None  # once
    (local / "xy").mkdir()
    (local / "xy/cxy.main.so").write_bytes(b"built here")  # the compile again, without the copy
    assert compile_cache.intact(failed)  # (the server saves over an intact copy of its key only where it failed)
    assert compile_cache.save(tmp_path / "cc", key, replace=True) == failed
    copied = {p.relative_to(failed / "inductor").as_posix() for p in (failed / "inductor").rglob("*") if p.is_file()}
    assert copied == {"xy/cxy.main.so"}


@pytest.mark.parametrize(("error", "level"), [(errno.ENOSPC, "WARNING"), (errno.EROFS, "INFO")])
def test_a_copy_that_cannot_be_written_leaves_nothing_and_a_full_disk_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: int, level: str
) -> None:
    """The compile's copy on a full disk (was logged at info, as a read-only image's expected refusal is): a warning
    naming the space left; either way no half-written copy or temporary directory stays."""
    local = tmp_path / "inductor-local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    (local / "fxgraph").mkdir(parents=True)

    def fails(source: Path, target: Path) -> None:
        target.mkdir(parents=True)
        (target / "half").write_bytes(b"x")
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(compile_cache, "_copy_out", fails)
    with caplog.at_level("INFO", logger="ddpm.compile"):
        assert compile_cache.save(tmp_path / "cc", machine_key("cpu", "fp32", "a" * 64)) is None
    record = next(r for r in caplog.records if "compiled graphs not written" in r.getMessage())
    assert record.levelname == level
    assert ("MiB free there" in record.getMessage()) == (level == "WARNING")
    assert list((tmp_path / "cc").iterdir()) == []


def test_replicas_that_save_one_key_at_once_keep_the_first_copy_without_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Two replicas sharing DDPM_COMPILE_CACHE_DIR, started together, both compile and both save: the second's rename
    met the first's copy and warned "not written ... the next start there compiles them again", which was not so."""
    local = tmp_path / "inductor-local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    (local / "ab").mkdir(parents=True)
    (local / "ab/cab.main.so").write_bytes(b"kernel")
    key = machine_key("cpu", "fp32", "a" * 64)
    first = compile_cache.save(tmp_path / "cc", key)
    assert first is not None
    with caplog.at_level("INFO", logger="ddpm.compile"):  # the second: the first's copy came before its rename
        assert compile_cache.save(tmp_path / "cc", key) is None
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "not written" in r.getMessage()]
    assert said == [("INFO", f"compiled graphs not written to {tmp_path / 'cc'}: another process wrote this key's copy first")]
    assert sorted(p.name for p in (tmp_path / "cc").iterdir()) == [first.name] and compile_cache.intact(first)


def test_an_earlier_copy_seeds_the_compile_and_the_new_copy_holds_what_it_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an upgrade (another code fingerprint), the old copy is loaded first: inductor's keys are of the graphs, so
    the unchanged ones load from it. The copy written after holds what this compile read (a kernel with its source
    beside it), loaded (a kernel library) or wrote (through a temporary file renamed, as inductor writes), plus what
    lies where the layout is not known here; not the old graphs it no longer uses, which would pile up otherwise."""
    local = tmp_path / "inductor-local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    files = {"fxgraph/ab/fabc/entry": b"used graph", "fxgraph/cd/fcde/entry": b"old graph", "ab/cab.main.cpp": b"src",
             "ab/cab.main.so": b"kernel", "cd/ccd.main.so": b"old kernel", "ef/cef.py": b"code", "triton/0/x/k.cubin": b"t"}  # fmt: skip
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    key = machine_key("cpu", "fp32", "a" * 64)
    old = compile_cache.save(tmp_path / "reuse", {**key, "code": "0" * 20})  # an earlier version's, in another directory
    shutil.rmtree(local)
    (local / "th").mkdir(parents=True)
    (local / "th" / "isa.so").write_bytes(b"written before the load: the key's ISA check")
    newer = compile_cache.save(tmp_path / "cc", {**key, "code": "1" * 20})  # a later version's, damaged: passed over
    assert newer is not None and old is not None
    (newer / "manifest.json").write_text("{}")
    said = compile_cache.load(tmp_path / "cc", key, (tmp_path / "reuse",))
    assert f"loaded {old}, built by other code" in said, said
    assert (local / "fxgraph/ab/fabc/entry").read_bytes() == b"used graph"
    # the compile: an unchanged graph and its kernel read, a library loaded (as an extension module, seen by its import),
    # a changed graph written; the other old graph and kernel left alone
    (local / "fxgraph/ab/fabc/entry").read_bytes()
    (local / "ef/cef.py").read_text()
    sys.audit("import", "cab.kernel", str(local / "ab/cab.main.so"), [], [], [])
    (local / "fxgraph/gh/fghi").mkdir(parents=True)
    (local / "fxgraph/gh/fghi/.tmp123").write_bytes(b"new graph")
    os.replace(local / "fxgraph/gh/fghi/.tmp123", local / "fxgraph/gh/fghi/entry")
    written = compile_cache.save(tmp_path / "cc", key)
    assert written is not None
    copied = {p.relative_to(written / "inductor").as_posix() for p in (written / "inductor").rglob("*") if p.is_file()}
    assert copied == {"fxgraph/ab/fabc/entry", "ab/cab.main.cpp", "ab/cab.main.so", "ef/cef.py", "triton/0/x/k.cubin",
                      "fxgraph/gh/fghi/entry"}  # fmt: skip
    assert old.exists()  # --reuse's directory is kept by its owner (compile_cache.keep), not by this save
    compile_cache.keep(written, tmp_path / "reuse")
    assert not old.exists() and (tmp_path / "reuse" / written.name / "inductor/fxgraph/gh/fghi/entry").read_bytes() == b"new graph"


def test_the_cpu_key_follows_the_isa_cap() -> None:
    # what an AVX-512 machine builds under ATEN_CPU_CAPABILITY=avx2 is what an AVX2-only CPU looks for
    script = "from ddpm.compile_cache import machine_key; import json; print(json.dumps(machine_key('cpu', 'fp32', 'x')))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    capped = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout)
    assert (capped["cpu_capability"], capped["vec_isa"]) == ("AVX2", "avx2")


def test_a_copy_for_another_machine_is_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "inductor-local"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    key = machine_key("cpu", "fp32", "a" * 64)
    assert "no compiled graphs for this machine" in compile_cache.load(tmp_path / "cc", key)
    # this machine's copy: saved from the local cache, loaded back into an empty one
    (local / "fxgraph").mkdir(parents=True)
    (local / "fxgraph" / "entry").write_bytes(b"graph")
    (local / "fxgraph" / "entry.lock").write_bytes(b"")
    (local / "fxgraph").chmod(0o700)  # as inductor and mkdtemp make them: a copy must be readable by other users
    path = artefact_path(tmp_path / "cc", key)
    abandoned, saving = path.with_name(f"{path.name}.tmp1"), path.with_name(f"{path.name}.tmp2")  # a stopped saver's, a live one's
    for scratch in (abandoned, saving):
        (scratch / "inductor").mkdir(parents=True)
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    saved = compile_cache.save(tmp_path / "cc", key)
    assert not abandoned.exists() and saving.exists()  # by age: another container's saver is not seen by its process id
    assert saved == path and not (saved / "inductor" / "fxgraph" / "entry.lock").exists()
    assert all(p.stat().st_mode & 0o004 for p in saved.rglob("*"))
    shutil.rmtree(local)
    assert "loaded compiled graphs" in compile_cache.load(tmp_path / "cc", key)
    assert (local / "fxgraph" / "entry").read_bytes() == b"graph"
    # a damaged copy (a truncated kernel library failed the whole compile, in every start: the server stayed eager) is
    # refused by its manifest and the local cache left as it was; one written before manifests were is loaded as it is
    shutil.rmtree(local)
    (saved / "inductor" / "fxgraph" / "entry").write_bytes(b"gra")
    said = compile_cache.load(tmp_path / "cc", key)
    assert "is damaged (1 files differ from its manifest, fxgraph/entry first)" in said and not list(local.rglob("*")), said
    (saved / "inductor" / "fxgraph" / "extra").write_bytes(b"")
    assert "is damaged (2 files" in compile_cache.load(tmp_path / "cc", key) and not compile_cache.intact(saved)
    (saved / "manifest.json").unlink()
    assert compile_cache.intact(saved) and "loaded compiled graphs" in compile_cache.load(tmp_path / "cc", key)
    (saved / "manifest.json").write_text("{}")
    (local / "fxgraph" / "entry").write_bytes(b"graph")  # the compile from scratch; its save replaces the damaged copy
    assert compile_cache.save(tmp_path / "cc", key) == saved and compile_cache.intact(saved)
    assert {p.name for p in (saved / "inductor" / "fxgraph").iterdir()} == {"entry"}
    # a copy built on another CPU, renamed to this machine's name: its key.json says otherwise
    shutil.rmtree(local)
    other = {**key, "vec_isa": "amx" if key["vec_isa"] != "amx" else "avx2"}
    (saved / "key.json").write_text(json.dumps(other))
    assert "built for another machine" in compile_cache.load(tmp_path / "cc", key) and not (local / "fxgraph").exists()
    (saved / "key.json").write_text("{garbage")
    assert "could not be loaded" in compile_cache.load(tmp_path / "cc", key)


def test_compile_cache_leaves_no_scratch_cache_behind(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`ddpm compile-cache` compiles in a fresh inductor cache of its own: gone when the command ends, as it
    fails or succeeds (each one left a directory in /tmp before, a kernel build's worth)."""
    import argparse

    from commands import serving_commands

    args = argparse.Namespace(output=str(tmp_path_factory.mktemp("out")), reuse=None)  # outside tmp_path, which must end empty
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR is read again
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "the-local-cache"))
    seen: list[Path] = []

    def compile_into_output(args: argparse.Namespace) -> int:
        seen.append(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
        (seen[-1] / "fxgraph").mkdir()
        (seen[-1] / "fxgraph" / "entry").write_bytes(b"graph")
        if len(seen) == 2:
            raise SystemExit("ddpm compile-cache: a failure")
        return 0

    monkeypatch.setattr(serving_commands, "_compile_into_output", compile_into_output)
    assert serving_commands.cmd_compile_cache(args) == 0
    with pytest.raises(SystemExit):
        serving_commands.cmd_compile_cache(args)
    assert [p.parent for p in seen] == [tmp_path, tmp_path] and seen[0] != seen[1]
    assert not any(p.exists() for p in seen) and list(tmp_path.iterdir()) == []


@needs_compiler
def test_the_machine_key_is_worked_out_only_where_graphs_are_read_or_written_and_behind_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key imports inductor (~3.4 s) and runs its ISA check (g++ on a test program per ISA, then a Python process
    loading it: ~4 s on a 2-core CPU with an empty cache, as in every container): without DDPM_COMPILE_CACHE_DIR
    nothing needs it, and with one the compile thread works it out before it compiles, not the loader before ready."""
    from ddpm.model_source import load_model_source
    from service import server_state
    from service.server_state import ServerState
    from service.settings import Settings

    asked: list[str] = []
    monkeypatch.setattr(server_state, "machine_key", lambda *args: asked.append("key") or machine_key(*args))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "local"))
    model = load_model_source(save_tiny_model(tmp_path / "tiny", num_timesteps=50), "cpu")
    for cache_dir in (None, tmp_path / "cc"):
        asked.clear()
        state = ServerState(Settings(model=model.path, compile="auto", compile_cache_dir=cache_dir, max_batch=2, warmup_steps=1))
        _, served = state._engine_on_hot_path(model, torch.device("cpu"), "f" * 64)  # the compile thread is not started
        assert not served.compiled and state.compiler is not None and asked == []  # nothing of it before ready
        state.compiler.before_build()  # what the compile thread runs first
        assert asked == ([] if cache_dir is None else ["key"]), cache_dir
        assert state.compiled_key == (None if cache_dir is None else machine_key("cpu", "fp32", "f" * 64))
        state.switch.close()  # type: ignore[union-attr]


# Every mount remounted read-only, one fresh tmpfs the only writable place (TMPDIR, inductor's and Triton's caches: the
# image's /tmp under compose `read_only: true` or Kubernetes `readOnlyRootFilesystem`), and DDPM_OUT, where given,
# bound writable (compile-cache's output). Inside a user + mount namespace: `unshare -rm`.
SANDBOX = r"""
set -e
for m in $(findmnt -rn -o TARGET | grep -v '^/proc\|^/sys\|^/dev'); do mount -o remount,bind,ro "$m" 2>/dev/null || true; done
mount -t tmpfs tmpfs "$DDPM_RW"
if [ -n "${DDPM_OUT:-}" ]; then mount --bind "$DDPM_OUT" "$DDPM_OUT"; mount -o remount,bind,rw "$DDPM_OUT"; fi
if touch "$DDPM_PROBE" 2>/dev/null; then echo "the sandbox is not read-only" >&2; exit 3; fi
exec "$@"
"""


def _sandbox_works() -> bool:
    if not (shutil.which("unshare") and shutil.which("findmnt")):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@needs_compiler
def test_compile_cache_then_a_server_that_starts_warm_on_a_read_only_root(tmp_path: Path) -> None:
    """The image's life on a read-only root with only a tmpfs writable: `ddpm compile-cache` compiles cold there
    (inductor's C++ build in the tmpfs) and writes this machine's artefacts; a server there with an empty inductor
    cache and DDPM_COMPILE_CACHE_DIR compiles from them while it serves, and exits 0 on SIGTERM. The server's directory
    holds that copy as an earlier version of ddpm-serve left it (another code fingerprint: a kept volume after an
    upgrade): it loads it, every graph loads rather than compiles (the code that changed changed no graph), and it
    writes its own copy, with the same files, in place of the old. (The image's read-only copy of its own key:
    tests/test_container.py.) Where user namespaces are not allowed, both run on the ordinary filesystem (a warning
    says so)."""
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50, config=SMALLEST)
    rw, out = tmp_path / "rw", tmp_path / "cc"
    rw.mkdir()
    out.mkdir()
    sandboxed = _sandbox_works()
    prefix = ["unshare", "-rm", "sh", "-c", SANDBOX, "sandbox"] if sandboxed else []
    if not sandboxed:
        warnings.warn("user + mount namespaces (unshare -rm) are not available: compile-cache and the server ran read-write", stacklevel=1)
    sandbox = {
        "DDPM_RW": str(rw),
        "DDPM_PROBE": str(tmp_path / "probe"),  # the test's own directory: must be read-only inside
        "TMPDIR": str(rw),
        "TORCHINDUCTOR_CACHE_DIR": str(rw / "torchinductor"),  # empty in each sandbox: a fresh tmpfs
        "TRITON_CACHE_DIR": str(rw / "triton"),
        "MPLCONFIGDIR": str(rw / "matplotlib"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # precision auto (bf16 where the CPU has it): the U-Net under autocast, as a server's default
    # batch 1 only: `compile-cache` compiles in an empty inductor cache (cold: ~30 s of g++ per graph on 2 cores)
    serving = {"DDPM_COMPILE": "auto", "DDPM_PRECISION": "auto", "DDPM_MAX_BATCH": "1", "DDPM_WARMUP_STEPS": "1", "DDPM_THREADS": "1"}
    built = subprocess.run([*prefix, sys.executable, "-m", "commands.main", "compile-cache", "--model", str(model), "-o", str(out)],
                           env={**os.environ, **serving, **sandbox, "DDPM_OUT": str(out)}, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert len(report["copies"]) == 1 and report["bytes"] > 0
    built_files = _files_of(out / report["copies"][0])
    assert not any(name.startswith("th/") for name in built_files), built_files  # the key's ISA check: not the compile's
    volume = tmp_path / "volume"  # the copy as the previous version left it
    shutil.copytree(out / report["copies"][0], volume / "compiled-earlier")
    (volume / "compiled-earlier" / "key.json").write_text(json.dumps({**json.loads((out / report["copies"][0] / "key.json").read_text()),
                                                                       "code": "0" * 20}))  # fmt: skip
    server = ServerProcess(model, prefix=prefix, DDPM_COMPILE_CACHE_DIR=str(volume), DDPM_OUT=str(volume), **serving, **sandbox)
    stop, served = threading.Event(), []

    def traffic() -> None:  # eager requests while the graphs compile: a lock-order deadlock between the two
        while not stop.is_set():  # threads (ddpm/precision.py, autocast's cache) froze this very scenario once
            try:
                served.append(httpx.post(server.url + "/generate", json={"seed": len(served), "steps": 2}, timeout=30).status_code)
            except httpx.HTTPError as exc:
                served.append(type(exc).__name__)

    try:
        server.wait_ready(120)
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            server.wait_metric('ddpm_hot_path_compiled{batch="2+"}', lambda v: v == 1, timeout=600)
        finally:
            stop.set()
            sender.join(60)
        assert served and set(served) == {200}, served[-5:]
        r = httpx.post(server.url + "/generate", json={"seed": 1, "batch_size": 2, "steps": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        info = next(line for line in httpx.get(server.url + "/metrics").text.splitlines() if line.startswith("ddpm_model_info{"))
        assert 'compiled="true"' in info
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.output()[-3000:]
        log = server.output()
    finally:
        server.stop()
    assert "compiled-earlier, built by other code" in log and "0 of them built by this process" in log, log[-3000:]
    assert sorted(p.name for p in volume.iterdir()) == report["copies"] and f"compiled graphs written to {volume}" in log
    assert _files_of(volume / report["copies"][0]) == built_files
    assert not (tmp_path / "probe").exists()


def _files_of(copy: Path) -> set[str]:
    """A copy's files, an FX graph or AOTAutograd entry by its key (the directory: the entry's own name differs per write)."""
    names = {p.relative_to(copy / "inductor").as_posix() for p in (copy / "inductor").rglob("*") if p.is_file()}
    return {name.rsplit("/", 1)[0] if name.startswith(("fxgraph/", "aotautograd/")) else name for name in names}


@needs_compiler
@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGHUP, 129, "its terminal hung up")])  # fmt: skip
def test_ctrl_c_or_sigterm_during_compile_cache_says_so_and_leaves_no_scratch(tmp_path: Path, sig: int, code: int, said: str) -> None:
    """The main thread's wait interrupted while the compile thread is inside inductor: the interpreter's exit under it
    aborted (the KeyboardInterrupt's traceback, then exit 134). SIGTERM (a CI job's timeout) killed it by the default
    action, the scratch inductor cache left in /tmp (a kernel build's worth each time)."""
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch_parent), "DDPM_MAX_BATCH": "1", "DDPM_WARMUP_STEPS": "1", "DDPM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "commands.main", "compile-cache", "--model", str(model), "-o", str(tmp_path / "out")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    end = time.monotonic() + 120
    while not any(scratch_parent.glob("ddpm-compile-cache-*/*")):  # inductor has begun writing into its scratch cache
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1][-2000:] if proc.poll() is not None else "no scratch"
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and err.strip().endswith(f"ddpm compile-cache: {said}"), err[-2000:]
    assert "terminate called" not in err and not any(scratch_parent.glob("ddpm-compile-cache-*"))


@needs_compiler
@pytest.mark.parametrize(("timeout", "said"), [("0.01", "the model did not load within --timeout 0.01 s"),
                                               ("4", "the compile did not finish within --timeout 4 s")])  # fmt: skip
def test_a_load_or_compile_past_its_timeout_exits_1_saying_so_and_leaves_no_scratch(tmp_path: Path, timeout: str, said: str) -> None:
    """Past --timeout in the load the command left by a normal exit while the loader thread was inside torch: exit 134
    ("terminate called without an active exception"); past it in the compile it said "batch sizes 1, 2+ did not
    compile (see the log)", and the two waits each had the whole --timeout."""
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch_parent), "DDPM_MAX_BATCH": "1", "DDPM_WARMUP_STEPS": "1", "DDPM_THREADS": "1"}
    argv = ["compile-cache", "--model", str(model), "-o", str(tmp_path / "out"), "--timeout", timeout]  # its compile: a minute
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "commands.main", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().endswith(f"ddpm compile-cache: {said}"), done.stderr[-2000:]
    assert time.monotonic() - start < 30 and not any(scratch_parent.glob("ddpm-compile-cache-*"))


@pytest.mark.parametrize(("flag", "output"), [("-o", "/proc/no/cc"), ("-o", "{file}/cc"), ("--reuse", "{file}/cc")])
def test_an_output_it_cannot_write_is_refused_before_the_compile(flag: str, output: str, tmp_path: Path) -> None:
    """It compiled for a minute and more (68 s for the tiny model here), then wrote nothing and exited 0 with
    ``"copies": []``: an image build would have shipped without its graphs. (A read-only directory is the same case,
    but the suite runs as root here, whom no mode stops.) --reuse's directory, written after the compile, likewise."""
    (tmp_path / "file").write_text("not a directory")
    output = output.replace("{file}", str(tmp_path / "file"))
    paths = {"-o": str(tmp_path / "out"), flag: output}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "commands.main", "compile-cache", *(a for item in paths.items() for a in item), "--model",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and done.stderr.strip().startswith(f"ddpm compile-cache: {flag} {output}: [Errno"), done.stderr
    assert time.monotonic() - start < 30 and not Path(output).exists()
