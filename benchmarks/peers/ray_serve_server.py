"""Peer 3: Ray Serve with ``@serve.batch`` around diffusers' pipeline (requests of one step count
share a pipeline call), one replica on a local Ray of this machine's CPUs.

    python benchmarks/peers/ray_serve_server.py --model DIR --port 8203 --max-batch 16 --wait-s 0.01
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_batch import CountedPipeline, parse_request, peer_arguments


def build(model: str, threads: int, max_batch: int, wait_s: float) -> serve.Application:
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Diffusers:
        def __init__(self) -> None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            self.pipeline = CountedPipeline(model, threads)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def generate(self, requests: list[dict[str, int]]) -> list[dict[str, list[str]]]:
            return [{"images": images} for images in self.pipeline.generate(requests)]

        async def __call__(self, request: Request) -> dict[str, list[str]]:
            return await self.generate(parse_request(await request.json()))

    return Diffusers.bind()


def main() -> None:
    args = peer_arguments(batching=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k in ("PEER_COUNTS_FILE", "PYTHONPATH")}})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build(args.model, args.threads, args.max_batch, args.wait_s), route_prefix="/generate", name="diffusers")
    while True:  # serve.run returns once deployed; the driver stops this process
        time.sleep(3600)


if __name__ == "__main__":
    main()
