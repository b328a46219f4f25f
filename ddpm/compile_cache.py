"""Compiled graphs that travel: inductor's cache directory, copied where the graphs were built (an
image build, ``ddpm compile-cache``, a first start with a writable ``DDPM_COMPILE_CACHE_DIR``) and
copied back into the local cache by the next process before it compiles.

What a later compile of the same graphs skips is in that directory: the FX graph and AOTAutograd
caches (the generated code) and the C++ (or Triton) kernels built from it. Measured on the shipped
model (BENCHMARKS.md, start-up): compiled 90 s after launch from an empty cache, 20 s from a copied
one. (``torch.compiler.save_cache_artifacts`` was tried first: it carries the generated code but not
the built CPU kernels, so g++ still ran and the start was no faster.)

Built code is only valid where it can run: inductor's CPU kernels use the vector ISA it picks (AVX-512
code on an AVX2-only CPU dies with SIGILL), CUDA kernels the device's capability. So each copy is named
by a key of everything the code depends on, and a ``key.json`` inside repeats it: a process on another
kind of CPU, GPU, torch, Python or ddpm-serve code finds no copy of its own key and compiles from scratch
(and writes its own copy where the directory is writable, removing the copies of this machine and model
that other code built); a copy whose ``key.json`` does not match its name is never loaded.

After an upgrade no copy has the new key; the newest copy of this machine and model that other code built seeds the
compile instead (inductor's own keys are of the graphs: the unchanged ones load). A copy holds what the compile used,
watched from the load to the save (``ddpm/opened_files.py``), not whatever else the local cache held (the seed's
graphs that no longer apply, another program's), so seeds do not pile up; and a manifest of its files' SHA-256, so a
damaged copy is refused rather than failing the compile (an unloadable kernel library fails it whole).

The CPU part of the key is the ISA the code targets, not the CPU's flags: inductor's vector ISA and
ATen's dispatch capability, both of which ``ATEN_CPU_CAPABILITY`` caps. So an AVX-512 machine builds
AVX2 graphs too (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ddpm compile-cache``: the image does,
beside its own), under the key an AVX2-only CPU computes for itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ddpm import opened_files
from ddpm.free_space import space_left

log = logging.getLogger("ddpm.compile")
KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"  # each file's SHA-256: a damaged copy is refused, not loaded (a truncated kernel library
# failed the whole compile: the server stayed eager)


def _vec_isa() -> str:
    """The vector ISA inductor's CPU kernels are built for here (avx512, amx, avx2, neon, ...)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return str(isa) if isa else "none"


def machine_key(device: torch.device | str, precision: str, model_fingerprint: str) -> dict[str, object]:
    """What compiled code depends on: this key names the artefact file."""
    device = torch.device(device)
    key: dict[str, object] = {
        "torch": torch.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "device": device.type,
        "precision": precision,
        "model": model_fingerprint,
        "code": code_fingerprint(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key["gpu"] = torch.cuda.get_device_name(index)
        key["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
    else:
        key["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's kernels
        key["vec_isa"] = _vec_isa()  # inductor's
    return key


PACKAGES = ("ddpm", "kernels", "service")  # the code torch.compile traces, and the code that says what it compiles


def code_fingerprint() -> str:
    """This project's own Python source, hashed: the same torch and model with other code may compile other graphs (a
    U-Net or step twin changed, a step variant added). Without it in the key, a copy in a kept volume
    (``DDPM_COMPILE_CACHE_DIR``) outlived an upgrade: loaded for nothing, the new graphs compiled from scratch at every
    start, and never written (a copy of the key was there). ~150 files, a few ms."""
    from importlib.util import find_spec

    digest = hashlib.sha256()
    for package in PACKAGES:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def artefact_path(directory: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(directory) / f"compiled-{digest}"


def inductor_cache() -> Path:
    """Inductor's local cache directory (TORCHINDUCTOR_CACHE_DIR, else its default under the temporary directory)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _ignore_locks(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".lock") or n.startswith("tmp")]


def load(directory: Path, key: dict[str, object], reuse: tuple[Path, ...] = ()) -> str:
    """Copy this machine's compiled graphs from ``directory`` into the local inductor cache; says what happened.
    Without a copy of this key, the newest copy of this machine and model that other code built (an earlier version's,
    in ``directory`` or a ``reuse`` directory) is copied in instead: inductor's own keys are of the graphs, so those
    that did not change load from it and only the changed ones compile. Either way the local cache is watched from
    here to ``save``, which copies only what the compile used."""
    path = artefact_path(directory, key)
    seed = path if path.is_dir() else _earlier_copy((Path(directory), *map(Path, reuse)), key)
    target = inductor_cache()
    earlier = seed != path  # found by _earlier_copy, which hashed its files against its manifest already
    try:
        said = _copy_in(seed, _without_code(key) if earlier else key, target, checked=earlier)
    finally:
        _watch(target)
    if said is not None:
        return said
    if seed is None:
        return f"no compiled graphs for this machine in {directory} (key {path.name}): compiling from scratch"
    _loaded[target] = (seed, _files(seed / "inductor"))
    if seed.name != path.name:  # the name is the key's hash
        return f"loaded {seed}, built by other code, into {target}: the graphs that did not change load from it"
    return f"loaded compiled graphs from {seed} into {target}"


def _copy_in(seed: Path | None, expected: dict[str, object], target: Path, checked: bool = False) -> str | None:
    """None where ``seed`` (if any) was copied into ``target``; else what went wrong. ``checked``: found intact already."""
    if seed is None:
        return None
    try:
        theirs = json.loads((seed / KEY_FILE).read_text(encoding="utf-8"))
        if (theirs if "code" in expected else _without_code(theirs)) != json.loads(json.dumps(expected)):
            return f"{seed} was built for another machine or version: ignored"
        damaged = [] if checked else _damaged(seed)
        if damaged:
            return f"{seed} is damaged ({len(damaged)} files differ from its manifest, {damaged[0]} first): compiling from scratch"
        shutil.copytree(seed / "inductor", target, dirs_exist_ok=True, ignore=_ignore_locks)
    except (OSError, ValueError, TypeError) as exc:  # a damaged copy costs a compile, never the server
        return f"{seed} could not be loaded ({type(exc).__name__}: {exc}): compiling from scratch"
    return None


def _manifest(inductor: Path) -> dict[str, str]:
    return {name: hashlib.sha256((inductor / name).read_bytes()).hexdigest() for name in sorted(_files(inductor))}


def _damaged(copy: Path) -> list[str]:
    """The files of ``copy`` that are missing, extra or changed against its manifest (a copy written before manifests
    were: none)."""
    try:
        manifest = json.loads((copy / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    found = _manifest(copy / "inductor")
    return sorted(name for name in set(manifest) | set(found) if manifest.get(name) != found.get(name))


def intact(copy: Path) -> bool:
    """Whether ``copy`` can be loaded as it is (a damaged one is refused, and replaced by the next save)."""
    try:
        return not _damaged(copy)
    except (OSError, ValueError):
        return False


def _without_code(key: dict[str, object]) -> dict[str, object]:
    """The key as ``key.json`` holds it, less the code: what a copy built by another version shares with this one."""
    return {name: value for name, value in json.loads(json.dumps(key)).items() if name != "code"}


def _this_machine_and_model(directory: Path, key: dict[str, object]) -> Iterator[tuple[Path, dict[str, object]]]:
    """The copies in ``directory`` (not a save in progress) whose key is ``key`` but for the code, with their keys."""
    same = _without_code(key)
    for other in Path(directory).glob("compiled-*") if Path(directory).is_dir() else ():
        if ".tmp" in other.name:
            continue
        try:
            theirs = json.loads((other / KEY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(theirs, dict) and _without_code(theirs) == same:
            yield other, theirs


def _earlier_copy(directories: tuple[Path, ...], key: dict[str, object]) -> Path | None:
    """The newest intact copy of this machine and model that other code built, in any of ``directories``."""
    found = []
    for directory in directories:
        for other, _ in _this_machine_and_model(directory, key):
            try:
                found.append((other.stat().st_mtime, str(other), other))
            except OSError:
                continue
    return next((copy for _, _, copy in sorted(found, reverse=True) if intact(copy)), None)


# The copy loaded into each local cache, with the names of its files there: what ``drop_loaded`` takes out again.
_loaded: dict[Path, tuple[Path, set[str]]] = {}


def drop_loaded() -> Path | None:
    """Take the files of the copy ``load`` put into the local cache out of it again, and watch the cache afresh, so that
    the next compile builds every graph itself; the copy, or None where none was loaded. A copy that passes its manifest
    can still fail to load (a kernel library that does not load on this host: "wrong ELF class"); the compile that
    loaded it failed, and every start that loaded it again stayed eager (measured: a copy with its .so files damaged
    after its manifest was written)."""
    target = inductor_cache()
    loaded = _loaded.pop(target, None)
    if loaded is None:
        return None
    copy, names = loaded
    for name in names:
        (target / name).unlink(missing_ok=True)
    _watch(target)
    return copy


# What the local cache held when the compile began (after any copy was loaded into it): save() copies the files of it
# that the compile opened, and the files it did not hold then (what the compile wrote).
_watching: dict[Path, set[str]] = {}


def _watch(target: Path) -> None:
    _watching[target] = _files(target)
    opened_files.watch(target)


def unwatch() -> None:
    """Stop watching the local cache where nothing will be saved (a copy of this key is there already)."""
    local = inductor_cache()
    _watching.pop(local, None)
    opened_files.stop(local)


def _files(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not _ignore_locks("", [p.name])}


# Inductor's cache layout: generated code and built CPU kernels in two-character shard directories, the FX graph and
# AOTAutograd entries under their own. Anything else there (Triton's cache on a GPU, ...) is copied whole.
KNOWN_LAYOUT = ("fxgraph", "aotautograd")


def used_files(root: Path, before: set[str], opened: set[str]) -> set[str]:
    """The files under ``root`` a copy keeps: those written since ``before`` was listed, those of ``before`` that were
    opened (with their siblings of the same stem: ``x.main.cpp`` beside the ``x.main.so`` loaded), and any in a
    directory whose layout is not known here."""
    stems = {_stem(name) for name in opened}

    def kept(name: str) -> bool:
        top = name.split("/", 1)[0]
        known = "/" in name and (top in KNOWN_LAYOUT or len(top) == 2)
        return name not in before or not known or _stem(name) in stems
    return {name for name in _files(root) if kept(name)}


def _stem(name: str) -> str:
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split('.', 1)[0]}"


def save(directory: Path, key: dict[str, object], *, replace: bool = False) -> Path | None:
    """Copy the local inductor cache to ``directory`` under this machine's key, atomically: what the compile used
    where ``load`` watched it (otherwise all of it); None when the directory is not writable (a read-only image: its
    own copy is already there). A copy of the key already there is replaced where it is damaged, or ``replace`` (it
    failed to load: ``drop_loaded``)."""
    path = artefact_path(directory, key)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    _remove_abandoned(path)
    try:
        tmp.mkdir(parents=True)
        _copy_out(inductor_cache(), tmp / "inductor")
        (tmp / MANIFEST_FILE).write_text(json.dumps(_manifest(tmp / "inductor"), indent=1), encoding="utf-8")
        (tmp / KEY_FILE).write_text(json.dumps(key, sort_keys=True, indent=1), encoding="utf-8")
        _readable_by_all(tmp)  # built as one user (an image build's root), loaded as another (uid 10001)
        if path.is_dir() and (replace or not intact(path)):  # refused or failed when loaded: replaced (another
            shutil.rmtree(path, ignore_errors=True)  # replica's good copy is kept)
        tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # a read-only image: its own copy is there already
            log.info("compiled graphs not written to %s: %s", directory, exc)
        elif exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and intact(path):  # replicas sharing the directory, compiled
            log.info("compiled graphs not written to %s: another process wrote this key's copy first", directory)  # at once
        else:  # a full disk, most often: worth an operator's look
            log.warning("compiled graphs not written to %s (%s: %s%s): the next start there compiles them again",
                        directory, type(exc).__name__, exc, space_left(directory))  # fmt: skip
        return None
    _remove_other_code(path, key)
    return path


def keep(copy: Path, directory: Path) -> None:
    """Put ``copy`` (a copy in another directory) in ``directory`` too, in place of the copy of its key there (this run
    may have compiled more batch sizes) and this machine's copies of the model built by other code: what the next
    ``load`` with ``directory`` among its ``reuse`` seeds from."""
    path = Path(directory) / copy.name
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        shutil.copytree(copy, tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except OSError as exc:  # the next build compiles more: never this one's failure
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("compiled graphs not kept in %s: %s", directory, exc)
        return
    _remove_other_code(path, json.loads((path / KEY_FILE).read_text(encoding="utf-8")))


def _copy_out(local: Path, target: Path) -> None:
    before, opened = _watching.pop(local, None), opened_files.stop(local)
    if before is None or opened is None:
        shutil.copytree(local, target, ignore=_ignore_locks)
        return
    target.mkdir()
    used = used_files(local, before, opened)
    for name in sorted(used):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local / name, target / name)
    log.info("compiled graphs: %d files copied, %d of them built by this process, %d loaded; %d files of the local cache "
             "left out", len(used), len(used - before), len(used & before), len(before - used))  # fmt: skip


def _remove_other_code(path: Path, key: dict[str, object]) -> None:
    """This machine's copies of the model built by other code (an earlier version's, in a kept volume): no process of
    this key loads them again, and one would be left per upgrade."""
    for other, theirs in _this_machine_and_model(path.parent, key):
        if other != path and theirs.get("code") != key["code"]:  # not this key's own
            shutil.rmtree(other, ignore_errors=True)
            log.info("removed %s: this machine's compiled graphs of this model, built by other code", other)


ABANDONED_AFTER_S = 3600.0  # a save takes seconds; a scratch copy this old was left by a process that stopped mid-save


def _remove_abandoned(path: Path) -> None:
    """Scratch copies of this key that a stopped process left (a server leaves its compile thread behind when it
    stops: commands/serving_commands.py). By age, not by process id: replicas sharing the directory from other
    containers have process ids this one cannot see."""
    import time

    for old in path.parent.glob(f"{path.name}.tmp*"):
        try:
            if time.time() - old.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _readable_by_all(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        os.chmod(p, mode | 0o444 | (0o111 if p.is_dir() else 0))


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
