"""Peer 1: FastAPI around diffusers' pipeline, one pipeline call per request (no batching).

    python benchmarks/peers/fastapi_server.py --model DIR --port 8201
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_batch import CountedPipeline, parse_request, peer_arguments


def main() -> None:
    args = peer_arguments(batching=False)
    pipeline = CountedPipeline(args.model, args.threads, args.device)
    app = FastAPI()

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, list[str]]:  # a plain def: FastAPI runs it in its thread pool
        return {"images": pipeline.generate([parse_request(body)])[0]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
