"""Seconds from launching a ``ddpm`` command to its exit, where the command's own imports are most of it: a refusal
of a bad flag, a client's small request, the MNIST digits every ``ddpm train`` / ``eval`` reads. Medians of fresh
processes; with ``--against DIR`` (another checkout, e.g. a ``git worktree`` of an older commit) both side by side,
alternating, in one run.

    python benchmarks/command_startup.py --url http://127.0.0.1:8000 --against /tmp/old
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MNIST = "import time; from ddpm.data import mnist_digits; t = time.perf_counter(); mnist_digits(); print(time.perf_counter() - t)"


def cases(url: str | None) -> dict[str, tuple[list[str], int]]:
    """Each case's arguments and the exit code it must end with (a refusal: 1)."""
    refused = ["-m", "commands.main", "generate", "--url", "http://127.0.0.1:9", "--retries", "0", "-o", "x.foo"]
    found = {
        "ddpm generate -o x.foo (refused)": (refused, 1),
        "ddpm serve --max-batch 0 (refused)": (["-m", "commands.main", "serve", "--max-batch", "0"], 1),
        "MNIST digits read (ddpm.data.mnist_digits, in-process seconds)": (["-c", MNIST], 0),
    }
    if url:  # a new seed each time: the server's response cache would answer a repeat without the chain
        client = ["-m", "commands.main", "generate", "--url", url, "--retries", "0", "-n", "1", "--steps", "2", "--quiet", "-o", "g.png"]
        found["ddpm generate -n 1 --steps 2 -o grid.png (a server's answer)"] = ([*client, "--seed", "{seed}"], 0)
    return found


def seconds(checkout: Path, argv: list[str], code: int, scratch: Path) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # that checkout's code, ahead of the installed one
    done = subprocess.run([sys.executable, *argv], cwd=scratch, capture_output=True, text=True, env=env)
    took = time.perf_counter() - start
    if done.returncode != code:
        raise SystemExit(f"{' '.join(argv)} in {checkout}: exit {done.returncode}, not {code}: {done.stderr[-500:]}")
    return float(done.stdout.strip()) if argv[0] == "-c" else took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server for the client's row (none: the row is left out)")
    p.add_argument("--against", type=Path, default=None, help="another checkout, measured beside this one")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    checkouts = {"this": ROOT} | ({"against": args.against.resolve()} if args.against else {})
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "ddpm-command-startup"
    scratch.mkdir(exist_ok=True)
    print(f"| command | {' | '.join(f'{name} s' for name in checkouts)} |" + (" against / this |" if args.against else ""))
    print("|---" * (len(checkouts) + 1 + bool(args.against)) + "|")
    seed = 0
    for name, (argv, code) in cases(args.url).items():
        times: dict[str, list[float]] = {which: [] for which in checkouts}
        for _ in range(args.rounds):
            for which, checkout in checkouts.items():
                seed += 1
                times[which].append(seconds(checkout, [a.replace("{seed}", str(seed)) for a in argv], code, scratch))
        medians = {which: statistics.median(t) for which, t in times.items()}
        cells = " | ".join(f"{m:.2f}" for m in medians.values())
        ratio = f" {medians['against'] / medians['this']:.1f}x |" if args.against else ""
        print(f"| {name} | {cells} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
