"""ddpm-serve against the servers a user would otherwise pick, on the same diffusers model directory.

    benchmarks/peers/run.sh                                  # sets up the peers' venv, then runs this
    benchmarks/peers/run.sh --shape cifar10 --loads c16 --rounds 1

Systems (each its own process, started and stopped in turn; the order rotates every round):
  ddpm-serve fp32 / auto  ``ddpm serve`` on the directory: DDIM (eta 0) per request, compiled hot path
                          (ready only once compiled), precision fp32 or ``auto`` (bf16 where native)
  FastAPI + diffusers     diffusers' DDIMPipeline, one call per request
  LitServe                LitServe batching (max_batch_size 16, batch_timeout 0.01 s) around the pipeline
  Ray Serve               ``@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)`` around the pipeline
Every system: fp32 unless named, 2 torch threads (``--threads``), base64 PNGs in a JSON answer.

Loads (closed loop: each client sends its next request when its last one is answered; a short
unmeasured warm-up of the same load first):
  c1, c4, c16   one image of 20 steps per request, 1 / 4 / 16 clients
  mixed         16 clients, half send 10-step requests and half 100-step ones
  multi         4 clients, 4 images of 20 steps per request
Reported: images/s (images finished / time from the first request to the last answer) and latency
p50; mixed also the p50 of each chain length. Each system's U-Net image evaluations (ddpm-serve's
/metrics, the peers' counts file) are checked against images x steps of the answered requests, so
every system ran the same work; the mean U-Net batch is evaluations / calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from tests.prometheus_text import sample_value  # noqa: E402
from tests.server_process import free_port  # noqa: E402

SYSTEMS = ("ddpm-serve fp32", "ddpm-serve auto", "FastAPI + diffusers", "LitServe", "Ray Serve")
LOADS = {  # name: (clients, images per request, steps of client i)
    "c1": (1, 1, lambda i: 20),
    "c4": (4, 1, lambda i: 20),
    "c16": (16, 1, lambda i: 20),
    "mixed": (16, 1, lambda i: 10 if i % 2 == 0 else 100),
    "multi": (4, 4, lambda i: 20),
}


READY_SEED = 999_999_999  # the readiness probe's request; every measured request has a seed of its own (no cache hits)


@dataclass
class System:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ours: bool = False


def tiny_model(directory: Path) -> Path:
    """The 1.7M-parameter diffusers DDPM of the review (1x28x28, random weights, seeded)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(directory)
    return directory


def systems(args: argparse.Namespace, model: Path, work: Path) -> list[System]:
    ours_env = {"DDPM_THREADS": str(args.threads), "DDPM_COMPILE": "auto", "DDPM_COMPILE_BEFORE_READY": "true",
                "DDPM_COMPILE_CACHE_DIR": str(work / "compile-cache"), "DDPM_LOG_LEVEL": "warning"}  # fmt: skip
    ours = [sys.executable, "-m", "commands.main", "serve", "--host", "127.0.0.1", "--model", str(model)]
    peer = [args.peers_python]
    flags = ["--model", str(model), "--threads", str(args.threads)]
    batching = ["--max-batch", "16", "--wait-s", "0.01"]
    every = {
        "ddpm-serve fp32": System("ddpm-serve fp32", ours, {**ours_env, "DDPM_PRECISION": "fp32"}, ours=True),
        "ddpm-serve auto": System("ddpm-serve auto", ours, {**ours_env, "DDPM_PRECISION": "auto"}, ours=True),
        "FastAPI + diffusers": System("FastAPI + diffusers", [*peer, str(HERE / "fastapi_server.py"), *flags]),
        "LitServe": System("LitServe", [*peer, str(HERE / "litserve_server.py"), *flags, *batching]),
        "Ray Serve": System("Ray Serve", [*peer, str(HERE / "ray_serve_server.py"), *flags, *batching]),
    }
    return [every[name] for name in args.systems]


class Running:
    """One system's server process on a free port."""

    def __init__(self, system: System, work: Path) -> None:
        self.system = system
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.counts = work / f"counts-{self.port}.json"
        self.log = open(work / f"{system.name.replace(' ', '_')}-{self.port}.log", "w", encoding="utf-8")
        env = {**os.environ, **system.env, "PEER_COUNTS_FILE": str(self.counts), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([*system.command, "--port", str(self.port)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.started = time.monotonic()

    def evaluations(self) -> tuple[float, float]:
        """(U-Net calls, U-Net image evaluations) so far."""
        if self.system.ours:
            text = httpx.get(self.url + "/metrics", timeout=10).text
            return sample_value(text, "ddpm_iterations_total"), sample_value(text, "ddpm_image_steps_total")
        if not self.counts.exists():
            return 0.0, 0.0
        counts = json.loads(self.counts.read_text(encoding="utf-8"))
        return float(counts["unet_calls"]), float(counts["image_evals"])

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self.log.close()


async def post(client: httpx.AsyncClient, seed: int, steps: int, n: int) -> httpx.Response:
    body = {"seed": seed, "steps": steps, "batch_size": n, "sampler": "ddim", "eta": 0.0}
    return await client.post("/generate", json=body)


async def wait_ready(running: Running, timeout: float) -> float:
    """Seconds from start until the system answers a 1-image request (ddpm-serve: after /readyz)."""
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        while time.monotonic() - running.started < timeout:
            if running.proc.poll() is not None:
                raise RuntimeError(f"{running.system.name} exited: see {running.log.name}")
            try:
                if running.system.ours and (await client.get("/readyz")).status_code != 200:
                    raise httpx.HTTPError("not ready")
                if (await post(client, READY_SEED, 20, 1)).status_code == 200:
                    return time.monotonic() - running.started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{running.system.name} not ready in {timeout:.0f} s: see {running.log.name}")


async def drive(url: str, load: str, seconds: float, seed0: int) -> list[tuple[int, int, float]]:
    """Closed-loop clients for ``seconds``; returns (steps, images, latency s) of every answered request."""
    clients, n, steps_of = LOADS[load]
    done: list[tuple[int, int, float]] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=64)) as client:

        async def loop(i: int) -> None:
            seed = seed0 + 100_000 * i
            while time.monotonic() < end:
                start = time.monotonic()
                response = await post(client, seed, steps_of(i), n)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
                assert len(response.json()["images"]) == n
                done.append((steps_of(i), n, time.monotonic() - start))
                seed += 1

        await asyncio.gather(*(loop(i) for i in range(clients)))
    return done


async def measure(running: Running, load: str, seconds: float, warmup_s: float, seed0: int) -> dict[str, object]:
    await drive(running.url, load, warmup_s, seed0 + 5_000_000)
    calls0, evals0 = running.evaluations()
    start = time.monotonic()
    done = await drive(running.url, load, seconds, seed0)
    elapsed = time.monotonic() - start
    calls1, evals1 = running.evaluations()
    images = sum(n for _, n, _ in done)
    expected = sum(steps * n for steps, n, _ in done)
    row: dict[str, object] = {
        "images_per_s": images / elapsed,
        "p50_s": statistics.median(lat for _, _, lat in done),
        "requests": len(done),
        "unet_image_evals": evals1 - evals0,
        "expected_image_evals": expected,
        "mean_unet_batch": (evals1 - evals0) / max(1.0, calls1 - calls0),
    }
    for steps in sorted({s for s, _, _ in done}) if load == "mixed" else []:
        row[f"p50_{steps}_step_s"] = statistics.median(lat for s, _, lat in done if s == steps)
    return row


def versions(peers_python: str) -> dict[str, str]:
    packages = ("torch", "diffusers", "litserve", "ray", "fastapi", "uvicorn")
    script = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
    out = json.loads(subprocess.run([peers_python, "-c", script], capture_output=True, text=True, check=True).stdout)
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    isa = "AVX-512 + AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return {**out, "cpu": f"{cpu}, {os.cpu_count()} cores, {isa}", "python": platform.python_version()}


def table(results: list[dict[str, object]], loads: list[str], names: list[str]) -> str:
    """Markdown: images/s per system and load, median over rounds (p50 latency in brackets)."""

    def cell(name: str, load: str) -> str:
        rows = [r for r in results if r["system"] == name and r["load"] == load]
        if not rows:
            return "-"
        ips = statistics.median(float(r["images_per_s"]) for r in rows)  # type: ignore[arg-type]
        key = "p50_10_step_s" if load == "mixed" else "p50_s"
        p50 = statistics.median(float(r[key]) for r in rows)  # type: ignore[arg-type]
        return f"{ips:.2f} ({p50:.2f} s)"

    lines = ["| load | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for load in loads:
        lines.append(f"| {load} | " + " | ".join(cell(name, load) for name in names) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="ddpm-peers-"))
    if args.shape == "cifar10":
        from tests.published_ddpm import save_cifar10_shaped_pipeline

        model = save_cifar10_shaped_pipeline(work / "model")
    else:
        model = tiny_model(work / "model")
    every = systems(args, model, work)
    info = {"shape": args.shape, **versions(args.peers_python)}
    print(json.dumps(info), flush=True)
    results: list[dict[str, object]] = []
    for round_ in range(args.rounds):
        for system in every[round_ % len(every):] + every[: round_ % len(every)]:
            running = Running(system, work)
            try:
                ready_s = await wait_ready(running, args.ready_timeout)
                for index, load in enumerate(args.loads):
                    seconds = args.seconds * (2 if load == "mixed" else 1)
                    seed0 = (round_ * len(LOADS) + index) * 10_000_000  # clients add 100_000 i, the warm-up 5_000_000
                    row = {"system": system.name, "load": load, "round": round_, "ready_s": ready_s,
                           **await measure(running, load, seconds, args.warmup, seed0), **info}  # fmt: skip
                    if row["unet_image_evals"] != row["expected_image_evals"]:
                        row["mismatch"] = True
                    results.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                running.stop()
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for row in results:
                f.write(json.dumps(row) + "\n")
    names = [s.name for s in every]
    print(f"\n{args.shape}, images/s (p50 latency; mixed: p50 of the 10-step requests), median of {args.rounds} round(s)")
    print(table(results, args.loads, names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-python", default=str(HERE / ".venv" / "bin" / "python"), help="a python with litserve, ray[serve]")
    parser.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS), help="comma-separated, of: " + ", ".join(SYSTEMS))
    parser.add_argument("--shape", choices=("tiny", "cifar10"), default="tiny")
    parser.add_argument("--loads", type=lambda s: s.split(","), default=list(LOADS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per load (mixed: twice)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.jsonl"))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
