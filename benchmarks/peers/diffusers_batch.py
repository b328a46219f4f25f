"""What every peer server runs: diffusers' own DDIMPipeline on the model directory, one pipeline call
per group of requests that share a step count (what a user of Ray Serve's or LitServe's batching
writes: one call cannot mix chain lengths), with the U-Net's calls and image evaluations counted.

Each peer process writes its counts to ``PEER_COUNTS_FILE`` after every pipeline call, so the
driver can check that every system ran the same number of U-Net image evaluations per image.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from PIL import Image


class CountedPipeline:
    """DDIMPipeline (eta 0) on a diffusers DDPM directory, fp32, with its U-Net calls counted."""

    def __init__(self, model_dir: str, threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(threads)
        unet = UNet2DModel.from_pretrained(Path(model_dir) / "unet").eval()
        scheduler = DDIMScheduler.from_pretrained(Path(model_dir) / "scheduler")
        self.pipe = DDIMPipeline(unet=unet, scheduler=scheduler).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet_calls = 0
        self.image_evals = 0
        self.lock = threading.Lock()  # FastAPI runs pipelines on many threads at once: no lost counts
        forward = unet.forward

        def counted(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.unet_calls += 1
                self.image_evals += sample.shape[0]
            return forward(sample, *args, **kwargs)

        unet.forward = counted  # type: ignore[method-assign]
        self.counts_file = os.environ.get("PEER_COUNTS_FILE")

    def generate(self, requests: list[dict[str, int]]) -> list[list[str]]:
        """Base64 PNGs for each request ({seed, steps, batch_size}), one pipeline call per step count."""
        answers: list[list[str]] = [[] for _ in requests]
        for steps in sorted({r["steps"] for r in requests}):
            group = [i for i, r in enumerate(requests) if r["steps"] == steps]
            seeds = [requests[i]["seed"] * 4096 + k for i in group for k in range(requests[i]["batch_size"])]
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            with torch.inference_mode():
                out = self.pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, eta=0.0, output_type="np")
            images = out.images
            row = 0
            for i in group:
                for _ in range(requests[i]["batch_size"]):
                    answers[i].append(encode_png(images[row]))
                    row += 1
        self.write_counts()
        return answers

    def write_counts(self) -> None:
        if self.counts_file:
            with self.lock:  # the latest counts, written whole (a reader never sees half a file: rename)
                counts = json.dumps({"unet_calls": self.unet_calls, "image_evals": self.image_evals})
                partial = Path(f"{self.counts_file}.{threading.get_ident()}")
                partial.write_text(counts, encoding="utf-8")
                partial.replace(self.counts_file)


def encode_png(image: Any) -> str:
    """One HxWxC float image in [0, 1] as a base64 PNG (what ddpm-serve's /generate answers)."""
    array = (image * 255).round().clip(0, 255).astype("uint8")
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def parse_request(body: dict[str, Any]) -> dict[str, int]:
    return {"seed": int(body.get("seed", 0)), "steps": int(body.get("steps", 20)), "batch_size": int(body.get("batch_size", 1))}


def peer_arguments(batching: bool) -> argparse.Namespace:
    """The flags every peer server takes from run.py (and the batching ones where it batches)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check's server phase)")
    if batching:
        parser.add_argument("--max-batch", type=int, default=16)
        parser.add_argument("--wait-s", type=float, default=0.01)
    return parser.parse_args()
