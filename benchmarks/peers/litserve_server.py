"""Peer 2: LitServe with its request batching around diffusers' pipeline (requests of one step count
share a pipeline call).

    python benchmarks/peers/litserve_server.py --model DIR --port 8202 --max-batch 16 --wait-s 0.01
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_batch import CountedPipeline, parse_request, peer_arguments


class DiffusersAPI(ls.LitAPI):
    def __init__(self, model: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model, self.threads = model, threads

    def setup(self, device: str) -> None:
        self.pipeline = CountedPipeline(self.model, self.threads)

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads the body's schema from annotations: none = a JSON dict
        return parse_request(request)

    def batch(self, inputs: list[dict[str, int]]) -> list[dict[str, int]]:
        return inputs

    def predict(self, requests: list[dict[str, int]]) -> list[list[str]]:
        return self.pipeline.generate(requests)

    def unbatch(self, output: list[list[str]]) -> list[list[str]]:
        return output

    def encode_response(self, images: list[str]) -> dict[str, list[str]]:
        return {"images": images}


def main() -> None:
    args = peer_arguments(batching=True)
    api = DiffusersAPI(args.model, args.threads, max_batch_size=args.max_batch, batch_timeout=args.wait_s, api_path="/generate")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=600)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
