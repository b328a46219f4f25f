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

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ddpm.chain import EpsModel, StepCoefficients, StepFn
from ddpm.names import COMPILE_SETTINGS

log = logging.getLogger("ddpm.compile")
_THREAD = threading.local()


@contextlib.contextmanager
def serving_thread() -> Iterator[None]:
    """Mark the calling thread as one that serves: a compiled function called on it runs the graphs
    already built and nothing else (dynamo's run-only mode; a shape without a graph runs eagerly), so
    a request never waits for a compile. The engine's loop runs inside it; building graphs is the
    compile thread's job (``service/engine/background_compile.py``)."""
    before = getattr(_THREAD, "serving", False)
    _THREAD.serving = True
    try:
        yield
    finally:
        _THREAD.serving = before


def compiling_forbidden() -> bool:
    return getattr(_THREAD, "serving", False)


class CompiledFn:
    """``torch.compile(fn)`` that never compiles on a serving thread (``serving_thread``): there it is
    ``torch._dynamo.run(fn)``, which shares the graphs every other thread built and runs a frame with
    none eagerly."""

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        self.fn = fn
        self._compiling = torch.compile(fn, **options)
        self._cached_only = torch._dynamo.run(fn)

    def __call__(self, *args: Any) -> Any:
        return (self._cached_only if compiling_forbidden() else self._compiling)(*args)


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
        self._compiled = CompiledFn(self.module, mode="reduce-overhead" if cuda_graphs else None)

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
            if args[0].shape[0] >= 2:  # marked on aliases: the caller's tensors (the engine's x goes on to the step) stay unmarked
                args = tuple(a.detach() for a in args)
                for a in args:
                    torch._dynamo.maybe_mark_dynamic(a, 0)  # soft: a model that branches on the batch may specialise a size
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
    """``torch.compile`` of the PyTorch twin (Philox rounds + the affine update fused into one C++ loop).

    ONE graph for every call: the twin is always compiled with the multistep state and the edit terms
    (zeros for a batch without multistep rows, neutral terms for one without editing rows: every row then
    takes the plain path, as the twin's ``where`` picks it), and the batch dimension is unbacked (no
    specialisation of batch 1). Eight graphs before (batch 1 and 2+, times the four variants): a cold
    compile of the step went from ~90 s to ~20 s on a 2-core AVX2 CPU, and a plain row's rounding no
    longer depends on whether a neighbour edits (one kernel for every row).

    The per-row coefficients go in as the kernel's two tables, (8, B) and (5, B), not as 13 tensors of
    (B,): every input costs a copy, a mark and dynamo's checks on each call, which made the step's host
    time ~10x its loop's. Nine inputs instead of 20: 280 -> 120 us a call at 1 row, 740 -> 550 at 64
    (2-core AVX-512 EPYC, 1 thread; the outputs bit-identical)."""
    global _COMPILED_TWIN
    if _COMPILED_TWIN is None:
        from kernels.reverse_step import EditTerms, fused_reverse_step_torch

        def twin(x_t, eps, coefs, seeds, counter, state, known, mask, edit_rows):  # type: ignore[no-untyped-def]
            edit = EditTerms(known, mask, *edit_rows.unbind(0))
            return fused_reverse_step_torch(x_t, eps, StepCoefficients.from_stacked(coefs), seeds, counter, state, edit)

        compiled = CompiledFn(twin, dynamic=True)
        identity = [EditTerms.IDENTITY[name] for name in EditTerms.ROWS]  # a step that edits nothing

        def step(x_t, eps, coefs, seeds, noise_counter, x0_prev=None, edit=None):  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                b, device = x_t.shape[0], x_t.device
                counter = torch.as_tensor(noise_counter, dtype=torch.int64, device=device).expand(b)
                state = _marked(torch.zeros(x_t.shape, dtype=torch.float32, device=device)) if x0_prev is None else _rows(x0_prev)
                if edit is None:  # no row edits or jumps: every row's terms neutral, zeros for the image and mask no row reads
                    known, mask = (_marked(torch.zeros(x_t.shape, dtype=torch.float32, device=device)) for _ in range(2))
                    rows = _marked(torch.tensor(identity, device=device)[:, None].expand(-1, b).contiguous(), 1)
                else:
                    known, mask, rows = _rows(edit.known), _rows(edit.mask), _marked(edit.stacked(), 1)  # a stack copies
                table = _marked(coefs.stacked(), 1)
                out, x0 = compiled(_rows(x_t), _rows(eps), table, _rows(seeds), _rows(counter), state, known, mask, rows)
                return out, (x0 if x0_prev is not None else None)

        _COMPILED_TWIN = step
    return _COMPILED_TWIN


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A fresh inference tensor whose first (batch) dimension dynamo treats as unbacked: one graph for any
    batch. Fresh: a copy of every input, so no two inputs alias (dynamo guards on identity and storage
    offsets: the engine's coefficient rows are views of one table, restart's image and mask are x itself)
    and no mark reaches the caller's tensor."""
    with torch.inference_mode():
        t = t.clone(memory_format=torch.contiguous_format)
    return _marked(t)


def _marked(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` (made here, aliasing no other input) with its batch dimension ``dim`` marked unbacked."""
    from torch._dynamo.decorators import mark_unbacked  # dynamo (and sympy) only where something compiles

    mark_unbacked(t, dim)
    return t


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
        compiled: EpsModel = CompiledFn(eps_model)
    else:
        compiled = CompiledEps(module, cuda_graphs=cuda_graphs and torch.device(device).type == "cuda")
    log.info("torch.compile on %s: the first calls per batch shape compile (seconds to a minute)", device)
    compiled = with_precision(compiled, concrete, device)  # autocast around the compiled call: dynamo guards on it
    if requested == "auto" and backend == "torch":
        return HotPath(compiled, compiled_step_twin(), compiled=True, step_backend="torch_compiled", precision=concrete)
    return HotPath(compiled, None, compiled=True, step_backend=backend, precision=concrete)
