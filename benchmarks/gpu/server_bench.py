"""The GPU server end to end (issue 35): ``ddpm serve`` on the device under closed-loop HTTP clients,
beside the offline compiled sampler at the same batch and a FastAPI + diffusers server on the same GPU.

    python benchmarks/gpu/server_bench.py --device cuda          # the GPU check's `server` phase
    python benchmarks/gpu/server_bench.py --device cpu --dry-run # the same steps, tiny, on CPU (CI)

For each model (the shipped one, and a google/ddpm-cifar10-32-shaped diffusers U-Net of 35.7M
parameters with random weights): one ``ddpm serve`` process (compile auto, CUDA graphs, max batch 64)
timed from launch to ready, to its first answer and to compiled; then per chain (the server's default,
restart at 10 calls; and DDIM at 50 steps) and per concurrency (1, 16, 64 clients, one image per
request, each client sending its next request when its answer arrives): images/s, p50 and p95
latency. Then, with the server stopped, the offline compiled sampler (``ddpm.chain.sample`` on the
compiled hot path) on the same chain at batch = concurrency, every cell of a model in one process:
images/s. The cifar model is also served by ``benchmarks/peers/fastapi_server.py`` (diffusers'
DDIMPipeline, one call per request) for the 50-step chain. Peak GPU memory from the server's ``ddpm_gpu_memory_peak_allocated_bytes``.

Prints one markdown table per model and a JSON line per cell; served / offline is the goal's ratio
(>= 0.85 at every concurrency) and served / diffusers the peer's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.prometheus_text import sample_value  # noqa: E402
from tests.server_process import ServerProcess, free_port  # noqa: E402

CHAINS = {"default": {}, "ddim-50": {"sampler": "ddim", "steps": 50, "timestep_spacing": "trailing"}}


def closed_loop(url: str, body: dict[str, object], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads, each posting its next request when its answer arrives, for ``seconds``."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            seed = i * 1_000_000
            while time.monotonic() < stop:
                start = time.monotonic()
                r = http.post("/generate", json={"seed": seed, **body})
                seed += 1
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                with lock:
                    latencies.append(time.monotonic() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begun = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - begun
    latencies.sort()
    return {"images_per_s": round(len(latencies) / elapsed, 2), "p50_s": round(statistics.median(latencies), 4),
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 4), "requests": len(latencies)}  # fmt: skip


def wait_until(predicate, timeout: float) -> float | None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return time.monotonic()
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    return None


def serve(model: Path, device: str, concurrencies: list[int], chains: dict[str, dict[str, object]], seconds: float,
          compile_setting: str, max_batch: int) -> tuple[dict[str, object], list[dict[str, object]]]:  # fmt: skip
    launched = time.monotonic()
    server = ServerProcess(model, DDPM_DEVICE=device, DDPM_COMPILE=compile_setting, DDPM_MAX_BATCH=str(max_batch), DDPM_THREADS="0",
                           DDPM_WARMUP_STEPS="2", DDPM_RESPONSE_CACHE_MB="0", DDPM_MAX_IMAGES_PER_CLIENT="1024")  # fmt: skip
    cells = []
    try:
        server.wait_ready(600)
        ready = time.monotonic()
        httpx.post(server.url + "/generate", json={"seed": 0}, timeout=300).raise_for_status()
        first = time.monotonic()
        compiled = None
        if compile_setting != "off":
            compiled = wait_until(lambda: httpx.get(server.url + "/info", timeout=10).json()["compiled"], 900)
        for chain, body in chains.items():
            for c in concurrencies:
                cells.append({"chain": chain, "concurrency": c, **closed_loop(server.url, body, c, seconds)})
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        info = httpx.get(server.url + "/info", timeout=10).json()
    finally:
        server.stop()
    start = {"ready_s": round(ready - launched, 1), "first_answer_s": round(first - launched, 1),
             "compiled_s": None if compiled is None else round(compiled - launched, 1),
             "peak_gpu_memory_gib": round(sample_value(metrics, "ddpm_gpu_memory_peak_allocated_bytes") / 2**30, 2),
             "precision": info["precision"], "compile_fallbacks": info["compile_fallbacks"]}  # fmt: skip
    return start, cells


def offline(model: Path, device: str, cells: list[tuple[dict[str, object], int]], seconds: float, compile_setting: str) -> Iterator[float]:
    """Images/s of the offline compiled sampler for each (chain, batch) cell, in one fresh process per model (one
    load and one compiled hot path for all cells: a process per cell paid the start and the compile each time)."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from ddpm.offline_sampler import sample
from ddpm.inference_compile import hot_path
from ddpm.model_source import load_model_source
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.settings import Settings
cells, device = json.loads({json.dumps(json.dumps(cells))}), torch.device({device!r})
s = Settings()
model = load_model_source({str(model)!r}, device)
fast = hot_path(model.eps_model, model.module, device, {compile_setting!r}, precision=s.precision)
def run(spec, seed, batch):
    with torch.inference_mode():
        x = sample(fast.eps_model, model.schedule, seeds_to_tensor(image_seeds(seed, batch), device), model.image_shape, steps=spec.steps,
                   variance_type=model.variance_type, clip_denoised=spec.clip, sampler=spec.sampler, spacing=spec.spacing,
                   steps_offset=spec.steps_offset, device=device, step_fn=fast.step_fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
for chain, batch in cells:
    spec = model.chain(chain.get("sampler", s.default_sampler), chain.get("steps", s.default_steps), None,
                       chain.get("timestep_spacing", s.default_timestep_spacing))
    for seed in range(3):
        run(spec, seed, batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < {seconds}:
        run(spec, done + 10, batch)
        done += batch
    print(done / (time.perf_counter() - start), flush=True)
"""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors, subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errors, text=True
    ) as proc:
        assert proc.stdout is not None
        try:
            for _ in cells:  # each cell's figure as it is measured: a phase cut short keeps the rows before
                line = proc.stdout.readline()
                if not line:
                    proc.wait(60)
                    errors.seek(0)
                    raise RuntimeError(errors.read()[-2000:])
                yield round(float(line), 2)
        finally:
            if proc.poll() is None:  # the caller stopped early: no process left measuring
                proc.kill()


def diffusers_peer(model: Path, device: str, steps: int, concurrencies: list[int], seconds: float) -> dict[int, dict[str, float]]:
    port = free_port()
    command = [sys.executable, str(ROOT / "benchmarks/peers/fastapi_server.py"), "--model", str(model), "--port", str(port),
               "--device", device, "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 300) is None:
            raise RuntimeError("the diffusers server did not start")
        return {c: closed_loop(url, {"steps": steps, "batch_size": 1}, c, seconds) for c in concurrencies}
    finally:
        proc.kill()
        proc.wait(30)


PEER_MODELS = ("cifar10-32", "diffusers-tiny")  # diffusers directories: the peer can load them


def row(cell: dict[str, object], offline_ips: float, peer: dict[str, float] | None) -> str:
    """One table row; fills the cell's offline figure and its ratios in."""
    served = float(cell["images_per_s"])  # type: ignore[arg-type]
    cell["offline_images_per_s"] = offline_ips
    cell["served_over_offline"] = round(served / offline_ips, 3) if offline_ips else None
    cell["diffusers"] = peer
    vs = f"{peer['images_per_s']} | {served / peer['images_per_s']:.2f}" if peer else "- | -"
    return (f"| {cell['chain']} | {cell['concurrency']} | {served} | {cell['p50_s']} | {cell['p95_s']} | {offline_ips} | "
            f"{cell['served_over_offline']} | {vs} |")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny models, short cells, compile off: the machinery on CPU")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddpm-server-bench-") as scratch:  # the models it lays out, removed after
        return bench(args, Path(scratch))


def bench(args: argparse.Namespace, scratch: Path) -> int:
    if args.dry_run:
        from benchmarks.peers.run import tiny_model

        models = {"diffusers-tiny": tiny_model(scratch / "diffusers-tiny")}  # ours, the offline sampler and the peer on one model
        # max batch 4, not 64: the eager warm-up of every size to 64 took 14 s of the tiny model's 18 s start on CPU
        concurrencies, seconds, compile_setting, max_batch = [1], min(args.seconds, 1.0), "off", 4
        chains = {"default": {"steps": 3}, "ddim-50": {"sampler": "ddim", "steps": 3, "timestep_spacing": "trailing"}}
    else:
        from tests.published_ddpm import save_cifar10_shaped_pipeline

        models = {"shipped": ROOT / "models" / "mnist-28", "cifar10-32": save_cifar10_shaped_pipeline(scratch / "cifar10-32")}
        concurrencies, seconds, compile_setting, chains, max_batch = [1, 16, 64], args.seconds, "auto", CHAINS, 64
    header = ("| chain | clients | served images/s | p50 s | p95 s | offline images/s (batch = clients) | served / offline "
              "| diffusers images/s | served / diffusers |")  # fmt: skip
    for name, model in models.items():
        start, cells = serve(model, args.device, concurrencies, chains, seconds, compile_setting, max_batch)
        print(json.dumps({"model": name, **start}), flush=True)
        steps = int(chains["ddim-50"].get("steps", 50))  # type: ignore[call-overload]
        peer = diffusers_peer(model, args.device, steps, concurrencies, seconds) if name in PEER_MODELS else {}
        print(f"\n### {name} on {args.device}: ready {start['ready_s']} s, first answer {start['first_answer_s']} s, "
              f"compiled {start['compiled_s']} s, peak GPU memory {start['peak_gpu_memory_gib']} GiB\n")  # fmt: skip
        print(header)
        print("|---" * 9 + "|")
        rates = offline(model, args.device, [(chains[str(c["chain"])], int(c["concurrency"])) for c in cells], seconds, compile_setting)
        for cell, rate in zip(cells, rates, strict=True):
            print(row(cell, rate, peer.get(int(cell["concurrency"])) if cell["chain"] == "ddim-50" else None), flush=True)
            print(json.dumps({"model": name, **cell}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
