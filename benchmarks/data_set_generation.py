"""A data set through the server: ``ddpm generate -o x.npy`` (one part after another, all kept in memory, written at
the end: what the command did before ``-o folder/``) against ``-o folder/`` with 1, 2 and 4 parts in flight, on one
replica of the shipped model, in alternating rounds (each run its own seed, so no answer comes from the response cache).
Printed: images/s of each and its ratio to ``x.npy`` in the same round.

    .venv/bin/python benchmarks/data_set_generation.py --rounds 3 -n 512

The replica runs its defaults (the 10-call restart chain, 64 images a request, compiled graphs built before ready).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.command_in_process import WITHOUT_TORCH  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402

WAYS = {"npy": [], "folder-1": ["--parallel", "1"], "folder-2": ["--parallel", "2"], "folder-4": ["--parallel", "4"]}


def _run(url: str, way: str, seed: int, n: int, out: Path) -> float:
    target = str(out / "x.npy") if way == "npy" else f"{out / way}/"
    cmd = [sys.executable, "-c", WITHOUT_TORCH, "generate", "--url", url, "--seed", str(seed), "-n", str(n), "-o", target,
           "--quiet", *WAYS[way]]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DDPM_API_TOKEN": ""}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="the replica's DDPM_THREADS")
    args = parser.parse_args()
    server = ServerProcess(ROOT / "models" / "mnist-28", DDPM_MAX_BATCH="64", DDPM_THREADS=str(args.threads), DDPM_WARMUP_STEPS="4",
                           DDPM_COMPILE_BEFORE_READY="1")  # fmt: skip
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        server.wait_ready(timeout=600)
        seed = 1000
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else reversed(list(WAYS)):
                with tempfile.TemporaryDirectory() as out:
                    seed += 1
                    rates[way].append(_run(server.url, way, seed, args.n, Path(out)))
            print(f"round {r + 1}: " + ", ".join(f"{w} {rates[w][-1]:.1f}" for w in WAYS), flush=True)
    finally:
        server.stop()
    base = statistics.median(rates["npy"])
    print(f"\nmedian images/s over {args.rounds} rounds, {args.n} images each (ratio to x.npy, median of per-round ratios):")
    for way in WAYS:
        ratios = [a / b for a, b in zip(rates[way], rates["npy"], strict=True)]
        print(f"  {way:9s} {statistics.median(rates[way]):7.1f}  {statistics.median(ratios):.3f}  (x.npy median {base:.1f})")


if __name__ == "__main__":
    main()
