"""Classifier-free guidance over scales: what a class-conditional model gives when asked for a class.

    python benchmarks/guidance_table.py run --model training/mnist-28-cond/model -n 500      # one `ddpm eval` per cell
    python benchmarks/guidance_table.py report benchmarks/results/guidance_table.jsonl

Cells: the conditional model asked for classes k mod 10 (``--class-label balanced``) at guidance scales
0, 1, 2 and 4; the same model with the null label (unconditional); and the shipped unconditional model,
all at the same N, seed (images k = 0..N-1 of seed 0), sampler and steps. Each cell is a ``ddpm eval``
run (its JSON report is one line of the results file), so every figure has the command that made it.
Resumable: cells already in the results file are skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "guidance_table.jsonl"
SCALES = (0.0, 1.0, 2.0, 4.0)


def cells(model: str, shipped: str, scales: tuple[float, ...] = SCALES) -> list[tuple[str, list[str]]]:
    out = [(f"w={w:g}", ["--model", model, "--class-label", "balanced", "--guidance-scale", str(w)]) for w in scales]
    out.append(("null label", ["--model", model]))
    out.append(("shipped (unconditional)", ["--model", shipped]))
    return out


def run(args: argparse.Namespace) -> None:
    done = {json.loads(line)["cell"] for line in args.results.read_text(encoding="utf-8").splitlines()} if args.results.exists() else set()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name, extra in cells(args.model, args.shipped, args.scales):
        if name in done:
            continue
        report = args.results.with_suffix(".tmp.json")
        cmd = ["ddpm", "eval", *extra, "-n", str(args.n), "--seed", "0", "--sampler", args.sampler, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--precision", "fp32", "--quiet", "--report", str(report)]  # fmt: skip
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run([sys.executable, "-m", "commands.main", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
        line = {"cell": name, "command": " ".join(cmd), **json.loads(report.read_text(encoding="utf-8"))}
        with args.results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        report.unlink()


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text(encoding="utf-8").splitlines()]
    rows.sort(key=lambda r: (0, float(r["cell"][2:])) if r["cell"].startswith("w=") else (1, 0.0))  # scales in order, then the rest
    print("| cell | agreement | per-class FD (real vs real) | diversity | FD (real vs real) | confident share (real) | class entropy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s, ref = r["samples"], r["real_vs_real"]
        cond = "agreement" in r
        agree = f"{r['agreement']:.3f}" if cond else "-"
        pcfd = f"{r['per_class_fd']:.1f} ({r['per_class_fd_real_vs_real']:.1f})" if cond else "-"
        div = f"{r['diversity']:.3f}" if cond else "-"
        print(f"| {r['cell']} | {agree} | {pcfd} | {div} | {s['fd']:.2f} ({ref['fd']:.2f}) | "
              f"{s['confident_share']:.3f} ({ref['confident_share']:.3f}) | {s['class_entropy']:.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one ddpm eval per cell, appended to the results file")
    r.add_argument("--model", required=True, help="the class-conditional model directory")
    r.add_argument("--shipped", default="models/mnist-28", help="the unconditional model to compare with")
    r.add_argument("-n", type=int, default=500, help="images per cell (the held-out digits allow 500)")
    r.add_argument("--sampler", default="sde-dpmsolver++", help="the server's default sampler")
    r.add_argument("--steps", type=int, default=50, help="U-Net calls per image")
    r.add_argument("--batch-size", type=int, default=100, help="images per U-Net call")
    r.add_argument("--results", type=Path, default=RESULTS, help="JSON lines, one per cell")
    r.add_argument("--scales", type=lambda s: tuple(float(w) for w in s.split(",")), default=SCALES,
                   help="guidance scales, comma-separated (the issue's table: 0,1,2,4)")  # fmt: skip
    r.set_defaults(func=run)
    p = sub.add_parser("report", help="the markdown table of a results file")
    p.add_argument("results", nargs="?", default=str(RESULTS), help="the results file")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
