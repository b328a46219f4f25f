"""A server's resident memory over its start, its background compile and a burst, for two code trees side by side.

    git worktree add /tmp/before <rev>
    python benchmarks/server_memory.py --trees /tmp/before,. --rounds 2

Each run: ``ddpm serve`` (defaults: compile auto, max batch 64) from the tree, on the shipped model, with an empty
inductor cache of its own (the compile from scratch: the most memory a start takes); its RSS is polled every
0.2 s until ``/info`` says both batch groups compiled, then 8 concurrent requests of mixed sizes (10 calls each),
then 2 s idle. Trees alternate within a round. Prints a markdown table: peak RSS (VmHWM) over the start, RSS once
compiled, right after the burst and after the idle spell.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.load_test import rss_kb
from tests.server_process import free_port

BURST = (64, 37, 13, 64, 50, 3, 64, 21)


def _status_mib(pid: int) -> tuple[float, float]:
    rss, peak = rss_kb(pid)
    return rss / 1024, peak / 1024


def one_run(tree: Path, model: Path) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="ddpm-mem-") as cache, tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "DDPM_LOG_LEVEL": "warning"}
        cmd = [sys.executable, "-m", "commands.main", "serve", "--port", str(port), "--model", str(model)]
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            start, end = time.monotonic(), time.monotonic() + 600
            while time.monotonic() < end:
                assert proc.poll() is None, "the server exited"
                try:
                    paths = httpx.get(url + "/info", timeout=2).json().get("hot_path", {})
                    if paths and all(state == "compiled" for key, state in paths.items() if key in ("1", "2+")):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.2)
            compiled_s = time.monotonic() - start
            compiled, _ = _status_mib(proc.pid)

            def ask(n: int) -> None:
                r = httpx.post(url + "/generate", json={"seed": n, "batch_size": n, "steps": 10},
                               headers={"X-Forwarded-For": f"10.0.0.{n}"}, timeout=300)  # fmt: skip
                assert r.status_code == 200, r.text

            threads = [threading.Thread(target=ask, args=(n,)) for n in BURST]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            burst, _ = _status_mib(proc.pid)
            time.sleep(2)
            idle, peak = _status_mib(proc.pid)
            return {"compiled_s": compiled_s, "peak": peak, "compiled": compiled, "burst": burst, "idle": idle}
        finally:
            proc.kill()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=".", help="comma-separated code trees (a git worktree per revision)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "mnist-28"))
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    runs: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees if r % 2 == 0 else reversed(trees):
            runs[tree].append(one_run(tree, Path(args.model).resolve()))
            print(tree, runs[tree][-1], flush=True)
    print("\n| tree | runs | compiled after s | peak RSS MiB | RSS compiled MiB | after the burst MiB | after 2 s idle MiB |")
    print("|---|---|---|---|---|---|---|")
    for tree, done in runs.items():
        cells = [f"{statistics.mean(d[k] for d in done):.0f}" for k in ("compiled_s", "peak", "compiled", "burst", "idle")]
        print(f"| {tree} | {len(done)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
