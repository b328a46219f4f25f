"""Prepare the wheels the GPU check machine lacks, to travel with the working tree (git-ignored).

    python benchmarks/gpu/prepare_wheels.py                 # cp312 manylinux wheels for the GPU machine
    python benchmarks/gpu/prepare_wheels.py --local --dest /tmp/w   # this interpreter's (the dry run)

The GPU machine (issue 17) has Python 3.12 with torch 2.11, triton 3.6, numpy, safetensors, pillow,
prometheus-client, httpx, scipy, matplotlib, tqdm and pytest, and can download nothing. This
downloads the closure of what the check imports beyond that (the HTTP stack for the server tests,
diffusers for the sampler-vs-diffusers benchmark), at the versions in constraints.txt, drops every
wheel of a package the machine already has, and fails if the rest is over the carry budget.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ["fastapi", "python-multipart", "uvicorn", "pydantic-settings", "diffusers"]  # multipart: the upload routes
# on the GPU machine already (documented stack, and what torch and those packages pull in)
PRESENT = {
    "torch", "triton", "numpy", "safetensors", "pillow", "prometheus-client", "httpx", "httpcore", "h11", "anyio", "sniffio",
    "idna", "certifi", "scipy", "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil",
    "six", "packaging", "tqdm", "pytest", "iniconfig", "pluggy", "pygments", "filelock", "fsspec", "jinja2", "markupsafe",
    "networkx", "sympy", "mpmath", "typing-extensions", "setuptools",
    # seen there too (KINDS.md's package list, 2026-11): carrying a newer huggingface-hub broke the machine's
    # transformers (<2.0), which diffusers imports, in the first GPU run; its 1.33 satisfies diffusers 0.42
    "huggingface-hub", "hf-xet", "pyyaml", "regex", "requests", "charset-normalizer", "urllib3", "click", "zipp",
    "typer", "rich", "shellingham", "markdown-it-py", "mdurl", "annotated-doc", "uvloop",
}  # fmt: skip
CARRY_LIMIT_MIB = 64  # what the device tool carries per command, the repository's ignored paths included


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_project(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / "benchmarks" / "gpu" / "wheels")
    parser.add_argument("--local", action="store_true", help="wheels for this interpreter and platform (the CPU dry run)")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--limit-mib", type=float, default=40.0, help="fail above this (the carry budget is 64 MiB in all)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(args.dest)]
    cmd += ["-c", str(ROOT / "constraints.txt")]
    if not args.local:
        cmd += ["--python-version", args.python_version, "--implementation", "cp"]
        cmd += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    subprocess.run([*cmd, *NEEDED], check=True)
    kept, dropped = [], []
    for wheel in sorted(args.dest.glob("*.whl")):
        if wheel_project(wheel) in PRESENT:
            wheel.unlink()
            dropped.append(wheel.name)
        else:
            kept.append(wheel)
    total = sum(w.stat().st_size for w in kept) / 2**20
    (args.dest / "MANIFEST.txt").write_text("".join(f"{w.name}\n" for w in kept), encoding="utf-8")
    print(f"{len(kept)} wheels, {total:.1f} MiB in {args.dest} (dropped {len(dropped)} the machine has)")
    for w in kept:
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    if total > args.limit_mib:
        print(f"over the limit of {args.limit_mib} MiB (the device tool carries {CARRY_LIMIT_MIB} MiB in all)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
