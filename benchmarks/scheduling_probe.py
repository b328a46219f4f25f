"""Issue 37's reproduction: the 64-image RePaint request of ~20,000 U-Net calls an image (now a 422 naming
its cost), then 1-image requests beside a legal heavy one (64 images x 1000 calls), without and with a
deadline of 3x their latency alone.

    python benchmarks/scheduling_probe.py                 # server defaults (max batch 64)
    python benchmarks/scheduling_probe.py --max-batch 8   # the 64 images overfill the resident rows
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402


def npy(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-batch", default="64")
    args = p.parse_args()
    server = ServerProcess(ROOT / "models" / "mnist-28", DDPM_COMPILE="off", DDPM_THREADS="1", DDPM_RESPONSE_CACHE_MB="0",
                           DDPM_MAX_BODY_BYTES="1000000", DDPM_MAX_BATCH=args.max_batch)  # fmt: skip
    try:
        server.wait_ready(120)
        url = server.url + "/generate"

        def small(seed: int, **kw: object) -> tuple[int, float]:
            t = time.monotonic()
            r = httpx.post(url, json={"seed": seed, **kw}, timeout=600)
            return r.status_code, round(time.monotonic() - t, 3)

        alone = statistics.median([small(i)[1] for i in range(7)])
        print(f"1 image alone: {alone:.3f} s")
        img = np.full((1, 28, 28), 0.5)
        mask = np.ones((1, 28, 28))
        mask[..., :14] = 0

        def heavy(jump_length: int) -> dict[str, object]:
            return {"seed": 1, "batch_size": 64, "steps": 1000, "sampler": "ddpm", "image": npy(img), "mask": npy(mask),
                    "jump_length": jump_length, "jump_n_sample": 20}  # fmt: skip

        t = time.monotonic()
        r = httpx.post(url, json=heavy(1), timeout=60)
        print(f"jump_length 1: {r.status_code} in {time.monotonic() - t:.3f} s: {r.json()['detail'][:140]}")
        threading.Thread(target=lambda: httpx.post(url, json=heavy(1000), timeout=3600), daemon=True).start()
        time.sleep(8)
        for label, kw in (("no deadline", {}), (f"deadline_s {3 * alone:.3f}", {"deadline_s": round(3 * alone, 3)})):
            answers = [small(10 + i, **kw) for i in range(4)]
            worst = max(s for code, s in answers if code == 200) if any(c == 200 for c, _ in answers) else float("nan")
            print(f"beside 64 x 1000 calls, {label}: {answers}; worst answered / alone = {worst / alone:.1f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
