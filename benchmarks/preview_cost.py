"""What partial images cost: ``POST /generate/stream`` with ``previews`` 3 against 0, alternated request by request on one
``ddpm serve`` (the shipped model, compile off, 1 torch thread), a new seed each request (no cache hit).

    python benchmarks/preview_cost.py                     # batch sizes 1 and 16, 12 rounds
    python benchmarks/preview_cost.py --batch-sizes 1,4,64 --rounds 20

A preview costs no U-Net call (service/engine/previews.py: Eq. 15 from the call's own x_t and eps); what it adds is
the rows' copy to the host, a PNG each and its bytes on the stream. Prints the median answer time of each and their
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.server_process import ServerProcess  # noqa: E402


def streamed_s(url: str, body: dict) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", url + "/generate/stream", json=body, timeout=600) as r:
        text = "".join(r.iter_text())
    assert "event: result" in text, text[-300:]
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mnist-28")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    server = ServerProcess(args.model, DDPM_COMPILE="off", DDPM_THREADS="1", DDPM_LOG_LEVEL="warning")
    try:
        server.wait_ready(300)
        seed = 10_000
        for n in map(int, args.batch_sizes.split(",")):
            streamed_s(server.url, {"seed": 1, "batch_size": n, "previews": 3})  # warm: a size's first call is slow
            times: dict[int, list[float]] = {0: [], 3: []}
            for _ in range(args.rounds):
                for previews in times:
                    seed += 1
                    times[previews].append(streamed_s(server.url, {"seed": seed, "batch_size": n, "previews": previews}))
            plain, shown = statistics.median(times[0]), statistics.median(times[3])
            print(f"batch {n}: previews 0 {plain * 1000:.1f} ms, previews 3 {shown * 1000:.1f} ms (medians of {args.rounds}): "
                  f"ratio {shown / plain:.3f}", flush=True)  # fmt: skip
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
