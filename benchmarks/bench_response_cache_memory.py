"""What a response-cache entry really costs: process RSS grown per entry against what the cache counts.

    python benchmarks/bench_response_cache_memory.py                  # 1, 4, 16 and 64 images per entry
    python benchmarks/bench_response_cache_memory.py --images 1 --shape 1,28,28 --megabytes 60

Each size runs in a fresh process (freed memory stays with the allocator, so a second run in one
process would measure nothing). ``ratio`` is RSS grown / ``ddpm_response_cache_bytes``: 1.0 is exact
accounting. The per-entry bookkeeping (ENTRY_OVERHEAD_BYTES) is measured by the 1-image rows.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(images: int, shape: tuple[int, ...], megabytes: float) -> str:
    import torch

    from ddpm.chain import ChainSpec
    from ddpm.image_request import ImageRequest
    from service.response_cache import ImageKey, ResponseCache

    per_entry = images * int(torch.tensor(shape).prod()) * 4
    entries = max(1, int(megabytes * 2**20 / per_entry))
    cache = ResponseCache(1 << 40)
    spec = ChainSpec(50, "sde-dpmsolver++", 0.0, True, "trailing", 0)
    gc.collect()
    before = rss_bytes()
    batch = torch.randn(64, *shape)  # the running batch the engine copies finished rows out of
    for seed in range(entries):  # as the engine fills a job's images (Engine: job.images[k] = new_x[row].float().cpu())
        held = torch.zeros((images, *shape), dtype=torch.float32)
        for k in range(images):
            held[k] = batch[(seed + k) % 64].float().cpu()
        cache.put(ImageKey("f" * 64, "fp32", "cpu", ImageRequest(seed, images, spec)), held)
    gc.collect()
    grown = rss_bytes() - before
    pixels = entries * per_entry
    return (
        f"| {images} | {entries} | {pixels / 2**20:.1f} | {cache.size_bytes / 2**20:.1f} | {grown / 2**20:.1f} | "
        f"{grown / cache.size_bytes:.3f} | {(grown - pixels) / entries:.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="*", default=[1, 4, 16, 64], help="images per entry (one process each)")
    p.add_argument("--shape", default="1,28,28", help="C,H,W of an image (the shipped model's by default)")
    p.add_argument("--megabytes", type=float, default=60.0, help="pixels to cache per run")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: measure one size
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.one:
        print(measure(args.images[0], shape, args.megabytes))
        return
    import platform

    print(f"CPU: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| images per entry | entries | pixels MiB | counted MiB | RSS grown MiB | RSS / counted | RSS - pixels per entry (B) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.images:
        cmd = [sys.executable, __file__, "--one", "--images", str(n), "--shape", args.shape, "--megabytes", str(args.megabytes)]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
