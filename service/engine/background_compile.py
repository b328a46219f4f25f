"""Ready in seconds, compiled within a minute: serve eagerly while ``torch.compile`` builds the graphs.

Compiling the hot path costs ~40-200 s on a 2-core CPU (BENCHMARKS.md, start-up) and pays 1.1-1.4x per
step after. A replica that waits for it before /readyz turns 200 is useless to an autoscaler for
minutes, so by default (``DDPM_COMPILE_BEFORE_READY=false``) the server warms the eager path (seconds),
turns ready, and builds the compiled graphs in a background thread on its own copy of the U-Net,
through a second, never-started ``Engine`` whose warm-up runs the same iteration code the serving
engine runs. The serving engine calls a :class:`PathSwitch` as its eps model and step function: each
batch-size group ("1", "2+": dynamo compiles batch 1 apart from the dynamic rest) runs eagerly until
its compiled graphs exist, then compiled. The switch changes no image beyond the compiled path's own
bound (1e-4 against eager, as always); ``tests/test_background_compile.py`` checks it across the switch.

Priority: the compile runs at the serving threads' priority. Measured with 4 clients saturating a
2-core CPU (BENCHMARKS.md, start-up burst): at nice 10 the compile never finished within 150 s (eager
serving kept ~6.5 images/s, and would for ever under that load), at nice 5 half of it did; at nice 0
eager serving drops to ~1.3 images/s for ~2 minutes and then runs compiled at ~13: ahead of nice 10
after ~3.5 minutes, and the point of the compile is the long run.

Threads: dynamo compiles under its own global lock, and the eval-frame hook that diverts Python frames
into compiled code is per thread, so the serving thread's eager calls never enter dynamo; the
background thread only ever touches its own copy of the module (compiling it converts the module to
channels-last in place, which the serving copy must not see mid-forward).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable

import torch

from ddpm.chain import StepFn
from ddpm.inference_compile import HotPath
from ddpm.loaded_model import LoadedModel
from kernels.reverse_step import fused_reverse_step

log = logging.getLogger("ddpm.compile")
GROUPS = ("1", "2+")
EAGER, COMPILING, COMPILED, FAILED = "eager", "compiling", "compiled", "failed"


def group_of(batch: int) -> str:
    """The batch-size group a call belongs to (dynamo's own split: batch 1, and a dynamic batch >= 2)."""
    return "1" if batch == 1 else "2+"


def step_of(path: HotPath) -> StepFn:
    return path.step_fn or functools.partial(fused_reverse_step, backend=path.step_backend)


class PathSwitch:
    """The serving engine's eps model and step function: the eager path until ``enable(group, compiled)``,
    then the compiled one for that batch-size group. Called from the engine thread; switched from the
    compiling thread (one reference swap per group, read once per call: no lock needed under the GIL)."""

    def __init__(self, eager: HotPath) -> None:
        self.eager = eager
        self._paths: dict[str, HotPath] = dict.fromkeys(GROUPS, eager)
        self.states: dict[str, str] = dict.fromkeys(GROUPS, EAGER)
        self._steps: dict[str, StepFn] = dict.fromkeys(GROUPS, step_of(eager))  # built once: step() is the hot path
        self.on_change: Callable[[PathSwitch], None] | None = None

    def eps(self, x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        return self._paths[group_of(x.shape[0])].eps_model(x, t, *labels)

    def step(self, x_t: torch.Tensor, *args: object) -> object:
        return self._steps[group_of(x_t.shape[0])](x_t, *args)

    def mark(self, group: str, state: str) -> None:
        self.states[group] = state
        if self.on_change is not None:
            self.on_change(self)

    def enable(self, group: str, compiled: HotPath) -> None:
        self._steps[group] = step_of(compiled)
        self._paths[group] = compiled
        self.mark(group, COMPILED)

    def path(self, group: str) -> HotPath:
        return self._paths[group]


def fully_compiled(states: dict[str, str]) -> bool:
    """Every batch-size group runs the compiled graphs (``/info``'s and ``ddpm_model_info``'s ``compiled``)."""
    return all(state == COMPILED for state in states.values())


def compile_copy(model: LoadedModel, eager_eps: Callable[..., torch.Tensor]) -> tuple[Callable[..., torch.Tensor], torch.nn.Module]:
    """The (eps model, module) to compile: our own U-Net is deep-copied (compiling converts it to
    channels-last in place); a wrapped model (diffusers' adapter) is compiled as given, which leaves
    the module untouched, so it is shared."""
    if eager_eps is model.module:
        module = copy.deepcopy(model.module)
        return module, module
    return eager_eps, model.module


def build_in_background(
    model: LoadedModel,
    switch: PathSwitch,
    make_compiled: Callable[[Callable[..., torch.Tensor], torch.nn.Module], HotPath],
    make_engine: Callable[[LoadedModel, StepFn], object],
    warmup_steps: int,
    max_batch: int,
    on_done: Callable[[], None] = lambda: None,
) -> threading.Thread:
    """Start the thread that compiles the hot path group by group (batch 1 first: the load of a quiet
    server) and switches each group once its graphs exist."""
    eager_eps = switch.eager.eps_model

    def run() -> None:
        group = GROUPS[0]
        try:
            eps, module = compile_copy(model, eager_eps)
            compiled = make_compiled(eps, module)
            engine = make_engine(dataclasses.replace(model, eps_model=compiled.eps_model, module=module), step_of(compiled))
            for group, sizes in (("1", {1}), ("2+", {2, max_batch} if max_batch >= 2 else set())):
                if not sizes:
                    switch.enable(group, compiled)  # max_batch 1: there is no such batch
                    continue
                switch.mark(group, COMPILING)
                engine.warmup(max(1, warmup_steps), sizes=sizes)  # type: ignore[attr-defined]
                switch.enable(group, compiled)
                log.info("compiled hot path ready for batch %s", group)
            on_done()
        except BaseException as exc:  # the eager path keeps serving
            for g in GROUPS:
                if switch.states[g] != COMPILED:
                    switch.mark(g, FAILED)
            log.warning("background compile failed at batch %s (%s: %s); those batches stay eager", group, type(exc).__name__, exc)

    thread = threading.Thread(target=run, name="ddpm-compile", daemon=True)
    thread.start()
    return thread
