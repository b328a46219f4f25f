"""From launch to the first answer, and to the compiled speed: `ddpm serve` started as an operator would.

    python benchmarks/startup.py                        # the shipped model and the cifar10-32 shape, every start mode
    python benchmarks/startup.py --models shipped --modes background-cold,before-ready-cold
    python benchmarks/startup.py burst --seconds 60     # images/s per 10 s window from launch, 4 closed-loop clients
    python benchmarks/startup.py stalls --models shipped,diffusers-1.7m   # does any request wait for a compile?

Start modes (one fresh `ddpm serve` process each, default settings otherwise):
  background-cold   DDPM_COMPILE=auto (the default): ready on the eager path, compiling behind it; an empty inductor cache
  background-warm   the same, with the inductor cache the cold run left (a restarted replica on the same disk)
  before-ready-cold DDPM_COMPILE_BEFORE_READY=1 (the behaviour before): readiness waits for the compile; empty cache
  artefacts         the default, with an empty inductor cache but DDPM_COMPILE_CACHE_DIR holding what
                    `ddpm compile-cache` built beforehand (as the image ships them)
  upgrade           the same copy as an earlier version of ddpm-serve left it in a kept volume (another code
                    fingerprint in its key): the server seeds its compile from it and writes its own (before stop
                    66 an upgrade started cold: the background-cold row)
  eager             DDPM_COMPILE=off
Measured from the moment the process is launched: /readyz 200, the first answer to a default request
(1 image, the server's default chain), and /info saying every batch size runs compiled graphs.

stalls (issue 38's reproduction, an empty inductor cache, compile=auto): once /info says batch 1 is
compiled, one inpainting edit and one plain request at once; once every group is compiled, 16
concurrent requests, then 8, 12 and an edit again; each latency beside the same request's eagerly
served latency right after ready, and /info's compile_fallbacks. A request that waited for a compile
shows as seconds where its eager latency is a fraction of one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.published_ddpm import save_cifar10_shaped_pipeline
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "background-cold": {"DDPM_COMPILE": "auto"},
    "background-warm": {"DDPM_COMPILE": "auto"},
    "before-ready-cold": {"DDPM_COMPILE": "auto", "DDPM_COMPILE_BEFORE_READY": "1"},
    "artefacts": {"DDPM_COMPILE": "auto"},
    "upgrade": {"DDPM_COMPILE": "auto"},
    "eager": {"DDPM_COMPILE": "off"},
}
SERVER_ENV = {"DDPM_WARMUP_STEPS": "2", "DDPM_MAX_BATCH": "64", "DDPM_THREADS": "0"}


def build_artefacts(model: Path, directory: Path, scratch: Path) -> dict[str, object]:
    """`ddpm compile-cache` in its own process and inductor cache (what the image build runs)."""
    env = {**os.environ, **SERVER_ENV, "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor-build"), "DDPM_MODEL": str(model)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "commands.main", "compile-cache", "-o", str(directory)], env=env, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
    shutil.rmtree(scratch / "inductor-build", ignore_errors=True)
    return {**json.loads(out), "build_s": round(time.monotonic() - start, 1)}


def _model(name: str, scratch: Path) -> Path:
    if name == "shipped":
        return ROOT / "models" / "mnist-28"
    if name == "diffusers-1.7m":  # the review's diffusers model (its upsampler branches on batch >= 64)
        from benchmarks.peers.run import tiny_model

        return tiny_model(scratch / "diffusers-1.7m")
    return save_cifar10_shaped_pipeline(scratch / "cifar10-32")


def _wait(predicate, timeout: float) -> float | None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return None


def as_an_earlier_version(artefacts: Path, volume: Path) -> Path:
    """The copies in ``artefacts`` as an earlier version of ddpm-serve left them: another code fingerprint in the key."""
    shutil.rmtree(volume, ignore_errors=True)
    for copy in artefacts.glob("compiled-*"):
        shutil.copytree(copy, volume / f"{copy.name}-earlier")
        key = json.loads((copy / "key.json").read_text(encoding="utf-8"))
        (volume / f"{copy.name}-earlier" / "key.json").write_text(json.dumps({**key, "code": "0" * 20}), encoding="utf-8")
    return volume


def start(model: Path, mode: str, cache: Path, timeout: float, artefacts: Path | None = None) -> dict[str, object]:
    env = {**MODES[mode], "TORCHINDUCTOR_CACHE_DIR": str(cache), **SERVER_ENV}
    if artefacts is not None:
        env["DDPM_COMPILE_CACHE_DIR"] = str(artefacts)
    launched = time.monotonic()
    server = ServerProcess(model, **env)
    try:
        ready = _wait(lambda: httpx.get(server.url + "/readyz", timeout=1).status_code == 200, timeout)
        answered = None
        if ready is not None:
            r = httpx.post(server.url + "/generate", json={"seed": 0}, timeout=timeout)
            answered = time.monotonic() if r.status_code == 200 else None
        compiled = _wait(lambda: httpx.get(server.url + "/info", timeout=5).json()["compiled"], timeout) if mode != "eager" else None
        info = httpx.get(server.url + "/info", timeout=120).json()
    finally:
        server.stop()

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - launched, 1)

    return {"mode": mode, "ready_s": since(ready), "first_answer_s": since(answered), "compiled_s": since(compiled),
            "precision": info["precision"], "hot_path": info["hot_path"]}  # fmt: skip


def burst(model: Path, seconds: float, concurrency: int, cache: Path, mode: str) -> dict[str, object]:
    """Closed-loop clients from the moment of launch (a refused or failed request is retried after 0.2 s):
    completed images per 10 s window, and when the compiled graphs arrived."""
    env = {**MODES[mode], "TORCHINDUCTOR_CACHE_DIR": str(cache), **SERVER_ENV}
    launched = time.monotonic()
    server = ServerProcess(model, **env)
    done: list[float] = []
    stop = threading.Event()
    compiled_at: list[float] = []

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    ok = http.post(server.url + "/generate", json={"seed": len(done)}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    done.append(time.monotonic() - launched)
                else:
                    time.sleep(0.2)

    def watch() -> None:
        while not stop.is_set() and not compiled_at:
            try:
                if httpx.get(server.url + "/info", timeout=2).json().get("compiled"):
                    compiled_at.append(time.monotonic() - launched)
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)] + [threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(150)
    server.stop()
    windows = [sum(1 for d in done if w * 10 <= d < (w + 1) * 10) / 10 for w in range(int(seconds // 10))]
    return {"mode": mode, "images_per_s_by_10s_window": windows, "compiled_s": round(compiled_at[0], 1) if compiled_at else None}


def _edit_body(shape: list[int]) -> dict[str, object]:
    """An inpainting request (1 image, the left half repainted) for a model of ``shape``."""
    import base64
    import io

    import numpy as np

    image = np.full(shape, 0.5)
    mask = np.ones(shape)
    mask[..., : shape[-1] // 2] = 0.0
    encoded = []
    for array in (image, mask):
        buf = io.BytesIO()
        np.save(buf, array)
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    return {"seed": 1, "image": encoded[0], "mask": encoded[1], "steps": 10, "sampler": "ddim"}


def _latencies(url: str, bodies: list[dict[str, object]]) -> list[float]:
    """Each body posted at once from its own thread: seconds to each answer (all must be 200)."""
    out = [0.0] * len(bodies)

    def one(i: int) -> None:
        start = time.monotonic()
        r = httpx.post(url + "/generate", json=bodies[i], timeout=600)
        assert r.status_code == 200, r.text[:300]
        out[i] = round(time.monotonic() - start, 2)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def stalls(model: Path, cache: Path, timeout: float) -> dict[str, object]:
    """Latencies of the review's requests after each compile milestone, beside their eager latencies."""
    server = ServerProcess(model, **{"DDPM_COMPILE": "auto", "TORCHINDUCTOR_CACHE_DIR": str(cache), **SERVER_ENV})
    try:
        server.wait_ready(timeout)
        shape = httpx.get(server.url + "/info", timeout=30).json()["model"]["image_shape"]
        plain, edit = {"seed": 2, "steps": 20, "sampler": "ddim"}, _edit_body(shape)
        phases = {"edit+plain": [edit, plain], "16": [plain] * 16, "8": [plain] * 8, "12": [plain] * 12, "edit": [edit]}
        eager = {name: _latencies(server.url, bodies) for name, bodies in phases.items()}  # right after ready: all eager
        _wait(lambda: httpx.get(server.url + "/info", timeout=5).json()["hot_path"]["1"] == "compiled", timeout)
        served = {"edit+plain": _latencies(server.url, phases["edit+plain"])}
        _wait(lambda: httpx.get(server.url + "/info", timeout=5).json()["compiled"], timeout)
        served.update({name: _latencies(server.url, bodies) for name, bodies in phases.items() if name != "edit+plain"})
        info = httpx.get(server.url + "/info", timeout=30).json()
    finally:
        server.stop()
    return {"eager_s": eager, "served_s": served, "compile_fallbacks": info["compile_fallbacks"],
            "compiled_batches": info["compiled_batches"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="start", choices=["start", "burst", "stalls"])
    p.add_argument("--models", default="shipped,cifar10-32")
    p.add_argument("--modes", default="background-cold,background-warm,before-ready-cold,artefacts,eager")
    p.add_argument("--seconds", type=float, default=60.0, help="burst: how long")
    p.add_argument("--concurrency", type=int, default=4, help="burst: closed-loop clients")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}; python {platform.python_version()}", file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix="ddpm-startup-"))
    try:
        for name in args.models.split(","):
            model = _model(name, scratch)
            cache = scratch / f"inductor-{name}"
            for mode in args.modes.split(","):
                if mode.endswith("-cold") or mode in ("artefacts", "upgrade"):
                    shutil.rmtree(cache, ignore_errors=True)  # nothing compiled on this disk before
                artefacts = None
                if mode in ("artefacts", "upgrade"):
                    artefacts = scratch / f"artefacts-{name}"
                    if not artefacts.is_dir():
                        print(json.dumps({"model": name, "compile-cache": build_artefacts(model, artefacts, scratch)}), flush=True)
                if mode == "upgrade" and artefacts is not None:
                    artefacts = as_an_earlier_version(artefacts, scratch / f"volume-{name}")
                if args.what == "stalls":
                    shutil.rmtree(cache, ignore_errors=True)
                    print(json.dumps({"model": name, **stalls(model, cache, args.timeout)}), flush=True)
                    break  # one run per model: the modes do not apply
                if args.what == "start":
                    run = start(model, mode, cache, args.timeout, artefacts)
                else:
                    run = burst(model, args.seconds, args.concurrency, cache, mode)
                print(json.dumps({"model": name, **run}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
