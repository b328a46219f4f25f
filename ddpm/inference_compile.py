"""The compiled inference hot path: the U-Net in channels-last memory under ``torch.compile``, and the
compiled PyTorch twin of the fused step on CPU.

Measured on the 2-core CPU (BENCHMARKS.md, ``benchmarks/bench_sampler.py``): the compiled
channels-last U-Net is 1.1-1.4x the eager one, and the compiled Philox twin ~10x the eager twin.
Compiling costs ~10-60 s once per process (per input rank/dtype; batch 1 and batch >= 2 compile
separately), so the server pays it during warm-up, before /readyz turns 200.

``DDPM_COMPILE`` (server setting, and the CLI's default): ``auto`` compiles where inductor can run
(CUDA, or a CPU with a C++ compiler), ``on`` insists (fails when it cannot), ``off`` keeps eager mode.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import torch

from ddpm.chain import EpsModel, StepCoefficients, StepFn
from ddpm.names import COMPILE_SETTINGS

log = logging.getLogger("ddpm.compile")



def cpu_compiler_available() -> bool:
    """Inductor's CPU backend writes C++ and builds it with the system compiler."""
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def should_compile(setting: str, device: torch.device | str) -> bool:
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile setting must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if setting == "off":
        return False
    usable = torch.device(device).type == "cuda" or cpu_compiler_available()
    if setting == "on" and not usable:
        raise RuntimeError("compile=on needs CUDA or a C++ compiler (g++) for torch.compile on CPU; use compile=off")
    return usable


class CompiledEps:
    """eps_theta(x_t, t) through ``torch.compile`` of the module in channels-last memory.

    The batch dimension is marked dynamic (for batches >= 2), so the server's running batch, whose
    size changes every iteration, reuses a few graphs instead of recompiling per size (batch 1 is its
    own; for the shipped U-Net dynamo splits the rest at 16: graphs for 1, 2-15 and 16+).

    ``cuda_graphs`` (CUDA only): ``mode="reduce-overhead"``, which records one CUDA graph per input
    shape and replays it, so a call costs one launch instead of one per kernel. Measured on the H200
    (BENCHMARKS.md, "GPU"): the shipped U-Net's call 5.1x faster at batch 1-16, 1.3x at 256. The batch
    is padded up to a bucket (``graph_bucket``) so a running batch of any size replays one of a few
    graphs; the padding rows repeat the last row (a valid t and label) and are dropped. A graph's
    output buffer is overwritten by its next replay, so the result is copied out.
    """

    def __init__(self, module: torch.nn.Module, cuda_graphs: bool = False) -> None:
        self.module = module.to(memory_format=torch.channels_last)
        self.cuda_graphs = cuda_graphs
        self._compiled = torch.compile(self.module, mode="reduce-overhead" if cuda_graphs else None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``y``: the labels of a class-conditional U-Net (None: an unconditional call)."""
        with torch.inference_mode():
            n = x.shape[0]
            x, t = as_inference(x.contiguous(memory_format=torch.channels_last)), as_inference(t)
            args = (x, t) if y is None else (x, t, as_inference(y))
            padding = graph_bucket(n) - n if self.cuda_graphs else 0
            if padding:
                args = tuple(torch.cat([a, a[-1:].expand(padding, *a.shape[1:])]) for a in args)
                args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
            if args[0].shape[0] >= 2:
                for a in args:
                    torch._dynamo.mark_dynamic(a, 0)
            out = self._compiled(*args)
            if self.cuda_graphs:  # the graph's own buffer: copy out before the next replay overwrites it
                return out[:n].clone(memory_format=torch.contiguous_format)
            return out.contiguous()  # NCHW for the step (a no-op for one channel)


def graph_bucket(n: int) -> int:
    """The batch size a batch of ``n`` is padded to under CUDA graphs: the next power of two up to 64,
    then the next multiple of 64 (at most 7 graphs up to 64, and <= 1/2 wasted rows below it)."""
    return 1 << max(0, n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


def as_inference(x: torch.Tensor) -> torch.Tensor:
    """The tensor as an inference tensor (a copy when it is not one; call inside inference mode).

    Dynamo guards on a tensor's dispatch keys: an inference tensor and a normal one fail each other's
    guards, and a caller that mixes them (the engine's running batch is built from both) would
    recompile every few iterations until dynamo's cache limit silently falls back to eager mode.
    """
    return x if x.is_inference() else x.clone(memory_format=torch.preserve_format)


_COMPILED_TWIN: StepFn | None = None


def compiled_step_twin() -> StepFn:
    """``torch.compile`` of the PyTorch twin (Philox rounds + the affine update fused into one C++ loop)."""
    global _COMPILED_TWIN
    if _COMPILED_TWIN is None:
        from kernels.reverse_step import EditTerms, fused_reverse_step_torch

        compiled = torch.compile(fused_reverse_step_torch, dynamic=True)

        def step(x_t, eps, coefs, seeds, noise_counter, x0_prev=None, edit=None):  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                coefs = StepCoefficients(*(as_inference(getattr(coefs, n)) for n in StepCoefficients.names()))
                counter = as_inference(torch.as_tensor(noise_counter, dtype=torch.int64, device=x_t.device).expand(x_t.shape[0]))
                state = None if x0_prev is None else as_inference(x0_prev)
                if edit is not None:  # RePaint's and restart's jumps (restart is the default chain): a graph of its own
                    edit = EditTerms(*(as_inference(getattr(edit, n)) for n in ("known", "mask", *EditTerms.ROWS)))
                return compiled(as_inference(x_t), as_inference(eps), coefs, as_inference(seeds), counter, state, edit)

        _COMPILED_TWIN = step
    return _COMPILED_TWIN


@dataclass(frozen=True)
class HotPath:
    """What to sample with. ``step_fn`` None: the dispatcher ``fused_reverse_step`` with ``step_backend``."""

    eps_model: EpsModel
    step_fn: StepFn | None
    compiled: bool
    step_backend: str  # the step's concrete backend: triton, torch or torch_compiled
    precision: str = "fp32"  # the U-Net's concrete precision: fp32, bf16 or fp16 (ddpm/precision.py)


def hot_path(
    eps_model: EpsModel,
    module: torch.nn.Module,
    device: torch.device | str,
    setting: str,
    step_backend: str | None = None,
    precision: str = "fp32",
    cuda_graphs: bool = True,
) -> HotPath:
    """The eps model and step function to sample with: compiled where ``setting`` allows, else as given,
    with the U-Net (only) under autocast at ``precision`` (a setting: auto, fp32, bf16, fp16).

    ``step_backend`` (default: ``DDPM_STEP_BACKEND``): on CPU, ``auto`` becomes the compiled twin when
    compiling; a backend named explicitly is kept. ``cuda_graphs``: replay CUDA graphs of the compiled
    U-Net where the device is CUDA (``CompiledEps``)."""
    from ddpm.precision import resolve_precision, with_precision
    from kernels.reverse_step import check_backend
    from kernels.reverse_step import step_backend as env_step_backend

    requested = env_step_backend() if step_backend is None else step_backend
    backend = check_backend(requested, device)  # a forced backend that cannot run here fails now, with the reason
    concrete = resolve_precision(precision, device)
    if not should_compile(setting, device):
        return HotPath(with_precision(eps_model, concrete, device), None, compiled=False, step_backend=backend, precision=concrete)
    if eps_model is not module:  # a wrapped model (e.g. diffusers' UNet2DModel adapter): compile as given
        compiled: EpsModel = torch.compile(eps_model)
    else:
        compiled = CompiledEps(module, cuda_graphs=cuda_graphs and torch.device(device).type == "cuda")
    log.info("torch.compile on %s: the first calls per batch shape compile (seconds to a minute)", device)
    compiled = with_precision(compiled, concrete, device)  # autocast around the compiled call: dynamo guards on it
    if requested == "auto" and backend == "torch":
        return HotPath(compiled, compiled_step_twin(), compiled=True, step_backend="torch_compiled", precision=concrete)
    return HotPath(compiled, None, compiled=True, step_backend=backend, precision=concrete)
