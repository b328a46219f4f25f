"""The official openai client retrying a request longer than its timeout: with and without DDPM_RETRY_GRACE_S.

    python benchmarks/client_retries.py                  # grace 0 once, then the default grace (2 s) three times
    python benchmarks/client_retries.py --graces 0 2 5 --runs 1

One ``ddpm serve`` per run (the shipped model, compile off, 1 torch thread). The request (8 images, 100 DDIM steps) is
timed alone first; then the openai client asks for the same images of another seed with ``timeout`` = that time /
``--timeout-share`` (2.5) and ``max_retries=3``: each try times out and the client tries again after its back-off
(0.4-1 s), so it gets its images only if the tries can build on each other's work. Reported per run: answered or
``APITimeoutError``, after how long, the tries the server saw (its access lines: ``miss`` started a job, ``shared``
joined one, ``hit`` came from the cache) and the U-Net rows the tries cost (``ddpm_batch_occupancy_sum``, less the
alone request's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server_process import ServerProcess  # noqa: E402

BODY = {"n": 8, "steps": 100, "sampler": "ddim"}


def one_run(model: Path, grace: str, timeout_share: float) -> str:
    import openai

    server = ServerProcess(model, DDPM_COMPILE="off", DDPM_THREADS="1", DDPM_RETRY_GRACE_S=grace)
    try:
        server.wait_ready(300)
        start = time.monotonic()
        httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "seed": 99, **BODY}, timeout=300).raise_for_status()
        alone = time.monotonic() - start
        alone_rows = server.metric("ddpm_batch_occupancy_sum")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=alone / timeout_share, max_retries=3)
        start = time.monotonic()
        try:
            answer = client.images.generate(prompt="x", n=BODY["n"], extra_body={"seed": 1, "steps": BODY["steps"], "sampler": "ddim"})
            outcome = f"answered ({len(answer.data)} images)"
        except openai.APITimeoutError:
            outcome = "APITimeoutError"
        took = time.monotonic() - start
        time.sleep(0.5)  # the last try's access line
        tries = [line.get("cache", "?") for line in map(_json, server.output().splitlines())
                 if line.get("logger") == "ddpm.access" and line.get("seed") == 1]  # fmt: skip
        rows = server.metric("ddpm_batch_occupancy_sum") - alone_rows
        return (f"DDPM_RETRY_GRACE_S={grace}: alone {alone:.2f} s, client timeout {alone / timeout_share:.2f} s: {outcome} after "
                f"{took:.2f} s; tries {tries}; {rows:.0f} U-Net rows (the request alone: {alone_rows:.0f})")  # fmt: skip
    finally:
        server.stop()


def _json(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:
        return {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "mnist-28")
    p.add_argument("--graces", nargs="+", default=["0", "2"], help="DDPM_RETRY_GRACE_S values, one server each")
    p.add_argument("--runs", type=int, default=0, help="runs per grace (default: 1 for 0, 3 for the others)")
    p.add_argument("--timeout-share", type=float, default=2.5, help="the client's timeout = the request's alone time / this")
    args = p.parse_args()
    for grace in args.graces:
        for _ in range(args.runs or (1 if float(grace) == 0 else 3)):
            print(one_run(args.model, grace, args.timeout_share), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
