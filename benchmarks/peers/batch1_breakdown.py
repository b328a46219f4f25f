"""Where a batch-1 request's time goes: the same U-Net (the peer benchmark's diffusers directory), eager,
fp32, 20-step DDIM, each part in a fresh process so no part's OpenMP thread team touches another's.

    .venv/bin/python benchmarks/peers/batch1_breakdown.py [--threads 2] [--repeats 20]

Parts (ms per U-Net step; "engine" also splits its iteration into its four stages):
  unet, main thread          the U-Net called in a loop on the main thread (nothing else in the process)
  unet, worker thread        the same loop on a second thread, the main thread idle and without a team
  unet, worker after main    the same, after the main thread ran one parallel torch op (it keeps a team)
  diffusers pipeline         DDIMPipeline(num_inference_steps=20) on the main thread, per step
  engine                     ddpm-serve's Engine (no HTTP): a request's time / 20, and each stage's mean
  server                     `ddpm serve` (compile off) over HTTP from one client: a request's time / 20
The engine runs its U-Net on its own thread, as the server does: "unet, worker after main" is what it
would cost if any other thread of the process kept a team (tests/test_torch_threads.py guards that).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 20


def unet_loop(model_dir: str, repeats: int, where: str) -> dict[str, float]:
    import torch
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(Path(model_dir) / "unet").eval()
    x = torch.randn(1, *[unet.config.in_channels, unet.config.sample_size, unet.config.sample_size])
    t = torch.tensor([500])

    def loop() -> float:
        with torch.inference_mode():
            for _ in range(5):
                unet(x, t)
            start = time.perf_counter()
            for _ in range(repeats * STEPS):
                unet(x, t)
            return (time.perf_counter() - start) / (repeats * STEPS) * 1e3

    if where == "main":
        return {"ms_per_step": loop()}
    if where == "worker-after-main":
        torch.randn(64, 64, 64).round()  # one parallel op on the main thread: it keeps a team from now on
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(loop()))
    worker.start()
    worker.join()
    return {"ms_per_step": out[0]}


def pipeline(model_dir: str, repeats: int) -> dict[str, float]:
    from diffusers_batch import CountedPipeline

    counted = CountedPipeline(model_dir, threads=int(os.environ.get("BENCH_THREADS", "2")))
    request = {"seed": 0, "steps": STEPS, "batch_size": 1}
    counted.generate([request])
    calls = counted.unet_calls
    start = time.perf_counter()
    for seed in range(repeats):
        counted.generate([{**request, "seed": seed}])
    elapsed = time.perf_counter() - start
    assert counted.unet_calls - calls == repeats * STEPS, "the pipeline ran a different number of U-Net calls"
    return {"ms_per_step": elapsed / (repeats * STEPS) * 1e3}


def engine(model_dir: str, repeats: int) -> dict[str, float]:
    import torch

    from ddpm.chain import ChainSpec
    from ddpm.model_source import load_model_source
    from service.engine.engine import Engine
    from service.engine.job import Job

    model = load_model_source(model_dir, torch.device("cpu"))
    eng = Engine(model, max_batch=64)
    totals: dict[str, float] = {"admit": 0.0, "eps": 0.0, "step": 0.0, "advance": 0.0}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                totals[name] += time.perf_counter() - start

        return run

    for name in totals:
        setattr(eng, f"_{name}", timed(name, getattr(eng, f"_{name}")))
    eng.start()

    def one(seed: int) -> None:
        done = threading.Event()
        eng.submit(Job(seed=seed, n=1, chain=ChainSpec(STEPS, "ddim"), timeout_s=600, on_done=lambda job: done.set()))
        done.wait()

    for seed in range(3):
        one(10_000 + seed)
    for name in totals:
        totals[name] = 0.0
    iterations = eng.iterations
    start = time.perf_counter()
    for seed in range(repeats):
        one(seed)
    elapsed = time.perf_counter() - start
    eng.stop()
    n = eng.iterations - iterations
    assert n == repeats * STEPS, f"{n} iterations for {repeats} requests of {STEPS} steps"
    row = {"ms_per_step": elapsed / n * 1e3}
    row.update({f"{name}_ms": value / n * 1e3 for name, value in totals.items()})
    row["outside_iterations_ms"] = row["ms_per_step"] - sum(value / n * 1e3 for value in totals.values())
    return row


def server(model_dir: str, repeats: int, threads: int) -> dict[str, float]:
    import httpx

    from tests.server_process import ServerProcess

    env = {"DDPM_COMPILE": "off", "DDPM_PRECISION": "fp32", "DDPM_THREADS": str(threads), "DDPM_MAX_BATCH": "64"}
    proc = ServerProcess(model_dir, **env)
    try:
        proc.wait_ready(120)
        body = {"steps": STEPS, "sampler": "ddim", "eta": 0.0}
        with httpx.Client(base_url=proc.url, timeout=120) as client:
            for seed in range(3):
                client.post("/generate", json={**body, "seed": 10_000 + seed}).raise_for_status()
            start = time.perf_counter()
            for seed in range(repeats):
                client.post("/generate", json={**body, "seed": seed}).raise_for_status()
            elapsed = time.perf_counter() - start
    finally:
        proc.stop()
    return {"ms_per_step": elapsed / (repeats * STEPS) * 1e3}


PARTS = {
    "unet, main thread": lambda a: unet_loop(a.model, a.repeats, "main"),
    "unet, worker thread": lambda a: unet_loop(a.model, a.repeats, "worker"),
    "unet, worker after main": lambda a: unet_loop(a.model, a.repeats, "worker-after-main"),
    "diffusers pipeline": lambda a: pipeline(a.model, a.repeats),
    "engine": lambda a: engine(a.model, a.repeats),
    "server": lambda a: server(a.model, a.repeats, a.threads),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers DDPM directory (default: the peer benchmark's, built in a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="20-step requests per part")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in this (fresh) process
    args = parser.parse_args()
    if args.part:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["BENCH_THREADS"] = str(args.threads)
        print(json.dumps(PARTS[args.part](args)))
        return
    if args.model is None:
        from run import tiny_model

        args.model = str(tiny_model(Path(tempfile.mkdtemp(prefix="ddpm-breakdown-")) / "model"))
    print(f"{STEPS}-step DDIM, batch 1, eager fp32, {args.threads} threads, {args.repeats} requests per part\n")
    print("| part | ms per step | stages (engine): admit / eps / step / advance / outside, ms |")
    print("|---|---|---|")
    for part in PARTS:
        cmd = [sys.executable, __file__, "--part", part, "--model", args.model]
        cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DDPM_COMPILE": "off"})
        if out.returncode != 0:
            print(f"| {part} | failed: {out.stderr.strip().splitlines()[-1]} | |")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        stages = " / ".join(f"{row[k]:.2f}" for k in ("admit_ms", "eps_ms", "step_ms", "advance_ms", "outside_iterations_ms") if k in row)
        print(f"| {part} | {row['ms_per_step']:.2f} | {stages} |", flush=True)


if __name__ == "__main__":
    main()
