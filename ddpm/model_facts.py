"""Facts about a loaded model that clients and operators ask for (``GET /info``): the weights'
SHA-256, the model's fingerprint (what a cached image depends on), the parameter count and the cost
of one U-Net call."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

if TYPE_CHECKING:
    from ddpm.loaded_model import LoadedModel

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_files(model_dir: Path) -> list[Path]:
    """Every weights file under a model directory, in a stable order."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 of the weights: the file's own hash when there is one weights file (what ``sha256sum``
    prints), else the hash of the lines ``<sha256>  <relative path>`` of each file."""
    files = weight_files(model_dir)
    if not files:
        return ""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(p)}  {p.relative_to(model_dir).as_posix()}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _canonical_json(path: Path) -> str:
    """A config file as canonical JSON (key order and spacing do not change the fingerprint; values do)."""
    raw = path.read_bytes()
    try:
        return json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except (ValueError, UnicodeDecodeError):
        return "sha256:" + hashlib.sha256(raw).hexdigest()


def model_fingerprint(model: LoadedModel, weights_sha: str, code_version: str) -> str:
    """SHA-256 naming everything an image depends on besides the request: the weights, every JSON
    config of the model directory (a ddpm-serve ``config.json``; a diffusers ``model_index.json``,
    ``unet/config.json`` and ``scheduler/scheduler_config.json``), the maths the loader resolved from
    them (betas in float64, variance type, clipping, image shape, spacing and offset, classes, the
    recommended guidance scale: so a change of a default in the code changes it too) and the code's
    version. Two replicas with the same fingerprint, precision and device type give the same image
    for the same request; the response cache and the ETags are keyed on it."""
    digest = hashlib.sha256()

    def part(name: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        digest.update(f"{name}\x1f{len(data)}\x1f".encode())
        digest.update(data)

    part("code_version", code_version)
    part("weights_sha256", weights_sha)
    if model.path is not None:
        for config in sorted(p for p in model.path.rglob("*.json") if p.is_file()):
            part("config:" + config.relative_to(model.path).as_posix(), _canonical_json(config))
    part("betas", np.ascontiguousarray(model.schedule.betas, dtype=np.float64).tobytes())
    resolved = {
        "variance_type": model.variance_type.value,
        "clip_denoised": model.clip_denoised,
        "image_shape": list(model.image_shape),
        "timestep_spacing": model.timestep_spacing,
        "steps_offset": model.steps_offset,
        "num_classes": model.num_classes,
        "class_names": list(model.class_names),
        "guidance_scale": model.guidance_scale,
        "source": model.source,
    }
    part("resolved", json.dumps(resolved, sort_keys=True))
    return digest.hexdigest()


def weights_mtime(model_dir: Path) -> int | None:
    """When the newest weights file was written (Unix seconds), None when there is none."""
    return max((int(p.stat().st_mtime) for p in weight_files(model_dir)), default=None)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _FlopCount(TorchDispatchMode):
    """PyTorch's FLOP formulas (``torch.utils.flop_counter.flop_registry``: convolutions, matmuls,
    attention) summed over one call, as a dispatch mode only. FlopCounterMode also registers *global*
    module hooks for its per-module table; a server counts on first ``GET /info`` while torch.compile
    traces the U-Net in another thread, and dynamo then traced those hooks and failed the compile
    ("UnspecializedNNModuleVariable(UNet) is already tracked for mutation"). A dispatch mode is
    thread-local: nothing another thread runs sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No dynamo wrapper around ``__torch_dispatch__`` (TorchDispatchMode's default): its first call imports
        torch._dynamo, 1.8 s of every server's start before ready where nothing compiles (compile off); the count
        never runs under a compile."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def flops_per_image_step(
    eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], image_shape: tuple[int, int, int], device: torch.device
) -> int:
    """Floating-point operations (a multiply-add is 2) of one U-Net call on one image, by PyTorch's
    FLOP formulas over convolutions, matmuls and attention (elementwise work is not counted); touches
    no global state (``_FlopCount``), so it may run beside a compile or the serving thread."""
    x = torch.zeros((1, *image_shape), device=device)
    t = torch.zeros((1,), dtype=torch.long, device=device)
    with torch.no_grad(), _FlopCount() as counter:
        eps_model(x, t)
    return counter.total


@dataclass(frozen=True)
class ModelFacts:
    """Measured once at load (``GET /info``; the fingerprint keys the response cache and the ETags)."""

    weights_sha256: str
    fingerprint: str  # ddpm.model_facts.model_fingerprint: weights + every config + resolved maths + code version
    parameters: int
    device: str
    created: int  # the weights' mtime (Unix seconds; the load time when there are no files): /v1/models' "created"
    gflop_per_image_step: float | None  # one U-Net call on one image (flops_per_image_step); None: an op the counter cannot trace
