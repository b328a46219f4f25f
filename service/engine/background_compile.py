"""Ready in seconds, compiled within a minute, and never a compile on the serving thread.

Compiling the hot path costs ~40-240 s on a 2-core CPU (BENCHMARKS.md, start-up) and pays 1.1-1.4x per
step after. A replica that waits for it before /readyz turns 200 is useless to an autoscaler for
minutes, so by default (``DDPM_COMPILE_BEFORE_READY=false``) the server warms the eager path (seconds),
turns ready, and builds the compiled graphs in a background thread on its own copy of the U-Net.

The serving engine calls a :class:`PathSwitch` as its eps model and step function. The switch knows,
per call *shape* (``Signature``: the U-Net or the step, its rows, and its variant: class labels; the
multistep state; the edit/jump terms), whether the compile thread has run that shape through the
compiled path. A covered shape runs the compiled graphs; any other runs eagerly at once, and the switch
asks the compile thread to build it (``recompiles_avoided``): a batch size the warm-up did not reach, a
step variant it did not run (the first inpainting edit), a guided batch. And the serving thread cannot
compile even by accident: the engine's loop runs under ``ddpm.inference_compile.serving_thread``, where
a compiled function only runs graphs that exist (dynamo's run-only mode).

The compile thread (:class:`BackgroundCompiler`) first runs short chains through a never-started
``Engine`` (the serving engine's own iteration code: every sampler's step variant, batch 1, 2 and
max_batch), then sweeps every batch size from 1 to max_batch of every variant it saw: dynamo's guards
split the batch range where the model branches on it (diffusers' upsampler at 64, the shipped U-Net at
16), and running each size is what finds the splits, whatever they are. Then it waits for requests.

``/info``'s ``hot_path`` keeps the two groups ("1", "2+": compiled once the warm-up for them is done)
and adds ``compiled_batches`` (the covered sizes of each variant); the metrics count the eager calls
that stood in for a compile.

Priority: the compile runs at the serving threads' priority. Measured with 4 clients saturating a
2-core CPU (BENCHMARKS.md, start-up burst): at nice 10 the compile never finished within 150 s (eager
serving kept ~6.5 images/s, and would for ever under that load), at nice 5 half of it did; at nice 0
eager serving drops to ~1.3 images/s for ~2 minutes and then runs compiled at ~13.

Shutdown (``PathSwitch.close``) ends the build at the compile thread's next call: a compile under way
finishes, nothing after it starts.

Threads: dynamo compiles under its own global lock, and the eval-frame hook that diverts Python frames
into compiled code is per thread; the compile thread only ever touches its own copy of the module
(compiling converts it to channels-last in place, which the eager serving copy must not see).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ddpm.chain import StepFn
from ddpm.compile_cache import inductor_cache
from ddpm.free_space import free_mib
from ddpm.inference_compile import HotPath
from ddpm.loaded_model import LoadedModel
from kernels.reverse_step import EditTerms, StepCoefficients, fused_reverse_step
from service.engine.heap_trim import release_free_heap

log = logging.getLogger("ddpm.compile")
GROUPS = ("1", "2+")
EAGER, COMPILING, COMPILED, FAILED = "eager", "compiling", "compiled", "failed"

# (path, rows, variant): "unet" with the number of label tensors (0 or 1); "step" with whether it
# carries the multistep state (x0_prev) and the edit/jump terms
Signature = tuple[str, int, tuple[bool, ...]]


DYNAMO_ADVICE = "Set TORCHDYNAMO_VERBOSE"  # dynamo's closing line, on how to report a bug to PyTorch


def compile_failure(exc: BaseException) -> str:
    """Why the compile failed, in a line where the cause is a full disk: g++'s error is ~13 KB (the command, every
    warning) with "No space left on device" at its end. Measured: the image with a 64 MiB tmpfs on /tmp, where inductor
    writes ~160 MiB for the shipped model (its precompiled header alone did not fit)."""
    text = f"{type(exc).__name__}: {exc}"
    if "No space left on device" not in text:  # dynamo's error in one line, without its advice on reporting a bug
        return " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith(DYNAMO_ADVICE))
    places = sorted({str(Path(tempfile.gettempdir())), str(inductor_cache())})
    free = ", ".join(f"{p} has {mib:.0f} MiB free" for p in places if (mib := free_mib(p)) is not None)
    return f"no space left on device: {free}; compiling the shipped model writes ~160 MiB of inductor files there"


def group_of(batch: int) -> str:
    """The batch-size group a call belongs to (dynamo's own first split: batch 1, and a dynamic batch >= 2)."""
    return "1" if batch == 1 else "2+"


def step_of(path: HotPath) -> StepFn:
    return path.step_fn or functools.partial(fused_reverse_step, backend=path.step_backend)


def unet_signature(x: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> Signature:
    return ("unet", x.shape[0], (bool(labels),))


def step_signature(x_t: torch.Tensor, args: tuple[Any, ...]) -> Signature:
    """args: (eps, coefs, seeds, counters[, x0_prev[, edit]]), the step function's signature after x_t."""
    x0_prev = args[4] if len(args) > 4 else None
    edit = args[5] if len(args) > 5 else None
    return ("step", x_t.shape[0], (x0_prev is not None, edit is not None))


def with_rows(value: Any, n: int) -> Any:
    """``value`` (a tensor, a coefficient or edit dataclass, a tuple of them, None) with its batch made
    ``n`` rows long: its rows repeated or cut (example inputs of another batch size, for the sweep)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        index = torch.arange(n, device=value.device) % value.shape[0]
        out = value[index]
        return out.contiguous(memory_format=torch.channels_last) if value.dim() == 4 and _channels_last(value) else out
    if isinstance(value, (StepCoefficients, EditTerms)):
        return type(value)(**{f.name: with_rows(getattr(value, f.name), n) for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return tuple(with_rows(v, n) for v in value)
    return value


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _detached(value: Any) -> Any:
    """A copy the compile thread may keep while the engine goes on with the original."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (StepCoefficients, EditTerms)):
        return type(value)(**{f.name: _detached(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def ranges(sizes: Iterable[int]) -> str:
    """1,2,3,5,7,8 -> '1-3,5,7-8'."""
    out: list[str] = []
    for n in sorted(set(sizes)):
        if out and out[-1].split("-")[-1] == str(n - 1):
            start = out[-1].split("-")[0]
            out[-1] = f"{start}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


class PathSwitch:
    """The serving engine's eps model and step function: the compiled graphs for the shapes the compile
    thread has covered, the eager path for every other shape (which it asks the compile thread to cover).
    Called from the engine thread; ``covered`` grows from the compile thread (set adds under the GIL)."""

    def __init__(self, eager: HotPath) -> None:
        self.eager = eager
        self._eager_step = step_of(eager)
        self.compiled: HotPath | None = None  # published by the compile thread once the compiled path exists
        self._compiled_step: StepFn | None = None
        self.covered: set[Signature] = set()  # shapes run through the compiled path on the compile thread
        self.failed: set[Signature] = set()  # shapes the compiled path could not run: eager for good
        self._asked: set[Signature] = set()
        self.requests: queue.SimpleQueue[tuple[Signature, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self.recompiles_avoided = 0  # calls run eagerly because their shape had no graph yet (after the initial build)
        self.asking = False  # the initial build is done: a shape without a graph now is asked for
        self.states: dict[str, str] = dict.fromkeys(GROUPS, EAGER)
        self.on_change: Callable[[PathSwitch], None] | None = None
        self.on_fallback: Callable[[Signature], None] | None = None
        self.closed = threading.Event()  # the server is shutting down: the compile thread stops at its next call

    # --- the engine's calls ----------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        sig = unet_signature(x, labels)
        compiled = self.compiled
        if compiled is not None and sig in self.covered:
            return compiled.eps_model(x, t, *labels)
        self._missed(sig, (x, t, *labels))
        return self.eager.eps_model(x, t, *labels)

    def step(self, x_t: torch.Tensor, *args: Any) -> Any:
        sig = step_signature(x_t, args)
        step = self._compiled_step
        if step is not None and sig in self.covered:
            return step(x_t, *args)
        self._missed(sig, (x_t, *args))
        return self._eager_step(x_t, *args)

    def _missed(self, sig: Signature, args: tuple[Any, ...]) -> None:
        """A shape without a graph, served eagerly: ask the compile thread for it (once)."""
        if not self.asking or self.compiled is None or sig in self.failed:
            return
        self.recompiles_avoided += 1
        if self.on_fallback is not None:
            self.on_fallback(sig)
        if sig not in self._asked:
            self._asked.add(sig)
            self.requests.put((sig, _detached(args)))

    # --- the compile thread's side -----------------------------------------------------------------
    def publish(self, compiled: HotPath) -> None:
        self._compiled_step = step_of(compiled)
        self.compiled = compiled

    def cover(self, sig: Signature) -> None:
        self.covered.add(sig)
        self._changed()

    def mark(self, group: str, state: str) -> None:
        self.states[group] = state
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def path(self, group: str) -> HotPath:
        """The path a plain batch of this group runs now."""
        if self.compiled is not None and self.states[group] == COMPILED:
            return self.compiled
        return self.eager

    def compiled_batches(self) -> dict[str, str]:
        """The covered batch sizes of each shape variant, e.g. {"unet": "1-64", "step+x0_prev": "1-64"}."""
        by_variant: dict[str, list[int]] = {}
        for path, rows, variant in list(self.covered):
            names = ("labels",) if path == "unet" else ("x0_prev", "edit")
            key = "+".join([path, *(name for name, on in zip(names, variant, strict=True) if on)])
            by_variant.setdefault(key, []).append(rows)
        return {key: ranges(rows) for key, rows in sorted(by_variant.items())}

    def close(self) -> None:
        """End the compile thread's wait for requests, and its warm-up or sweep at the next call (a compile
        under way finishes first: dynamo cannot be interrupted)."""
        self.closed.set()
        self.requests.put(None)


class CompileStopped(Exception):
    """The switch was closed while the compile thread had graphs left to build."""


def _check_open(switch: PathSwitch) -> None:
    if switch.closed.is_set():
        raise CompileStopped("the server is shutting down")


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


class _Recorder:
    """The compiled path as the warm-up engine calls it: every shape it runs is covered (the call
    compiled it on this thread), and one example of each variant is kept for the sweep."""

    def __init__(self, switch: PathSwitch, compiled: HotPath) -> None:
        self.switch, self.compiled, self._step = switch, compiled, step_of(compiled)
        self.examples: dict[tuple[str, tuple[bool, ...]], tuple[Any, ...]] = {}

    def eps(self, x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        _check_open(self.switch)
        out = self.compiled.eps_model(x, t, *labels)
        self._record(unet_signature(x, labels), (x, t, *labels))
        return out

    def step(self, x_t: torch.Tensor, *args: Any) -> Any:
        _check_open(self.switch)
        out = self._step(x_t, *args)
        self._record(step_signature(x_t, args), (x_t, *args))
        return out

    def _record(self, sig: Signature, args: tuple[Any, ...]) -> None:
        self.examples.setdefault((sig[0], sig[2]), _detached(args))
        self.switch.cover(sig)


class BackgroundCompiler:
    """Builds the compiled path's graphs off the serving thread: the warm-up chains, the sweep over every
    batch size, then whatever shape the serving engine asks for (``PathSwitch.requests``)."""

    def __init__(
        self,
        model: LoadedModel,
        switch: PathSwitch,
        make_compiled: Callable[[Callable[..., torch.Tensor], torch.nn.Module], HotPath],
        make_engine: Callable[[LoadedModel, StepFn], object],
        warmup_steps: int,
        max_batch: int,
        on_done: Callable[[], None] = lambda: None,
        before_build: Callable[[], None] = lambda: None,
        drop_loaded: Callable[[], object] = lambda: None,
    ) -> None:
        self.model, self.switch, self.make_compiled, self.make_engine = model, switch, make_compiled, make_engine
        self.warmup_steps, self.max_batch, self.on_done, self.before_build = warmup_steps, max_batch, on_done, before_build
        self.drop_loaded = drop_loaded  # undoes what before_build loaded; what that was, or None: worth one more build
        self.compiled: HotPath | None = None
        self.thread: threading.Thread | None = None
        self.built = threading.Event()  # the warm-up and the sweep have ended (compiled, or failed)

    def start(self, initial: bool = True) -> threading.Thread:
        """The compile thread: the warm-up and sweep (``initial``), then requests until ``switch.close()``."""

        def run() -> None:
            if initial and not self.build():
                return
            self.serve_requests()

        self.thread = threading.Thread(target=run, name="ddpm-compile", daemon=True)
        self.thread.start()
        return self.thread

    def build(self, raise_errors: bool = False) -> bool:
        """The warm-up chains group by group (batch 1 first: the load of a quiet server), then the sweep;
        False (the eager path keeps serving every shape) if compiling failed."""
        switch, group = self.switch, GROUPS[0]
        try:
            self.before_build()  # (the server: its copied graphs into the local inductor cache)
            eps, module = compile_copy(self.model, switch.eager.eps_model)
            self.compiled = self.make_compiled(eps, module)
            recorder = _Recorder(switch, self.compiled)
            switch.publish(self.compiled)
            engine = self.make_engine(dataclasses.replace(self.model, eps_model=recorder.eps, module=module), recorder.step)
            for group, sizes in (("1", {1}), ("2+", {2, self.max_batch} if self.max_batch >= 2 else set())):
                switch.mark(group, COMPILING)
                if sizes:
                    engine.warmup(max(1, self.warmup_steps), sizes=sizes)  # type: ignore[attr-defined]
                    release_free_heap()
                    self._sweep(recorder, range(1, 2) if group == "1" else range(2, self.max_batch + 1))
                switch.mark(group, COMPILED)
                log.info("compiled hot path ready for batch %s (%s)", group, switch.compiled_batches())
            switch.asking = True
            self.on_done()
            return True
        except BaseException as exc:  # the eager path keeps serving
            if switch.closed.is_set():  # (a CompileStopped, perhaps wrapped by the warm-up's job error)
                log.info("background compile stopped at batch %s: the server is shutting down", group)
                return False
            switch.compiled = None
            loaded, self.drop_loaded, self.before_build = self.drop_loaded(), lambda: None, lambda: None
            if loaded is not None:  # graphs copied in from elsewhere that do not load here: built here instead, once
                log.warning("background compile failed at batch %s with the compiled graphs of %s loaded (%s): compiling "
                            "again without them", group, loaded, compile_failure(exc))  # fmt: skip
                switch.covered.clear()  # of the compiled path that failed: none runs until the new one covers it
                return self.build(raise_errors)
            for g in GROUPS:
                if switch.states[g] != COMPILED:
                    switch.mark(g, FAILED)
            log.warning("background compile failed at batch %s (%s); those batches stay eager", group, compile_failure(exc))
            log.debug("the background compile's error in full", exc_info=exc)
            if raise_errors:
                raise
            return False
        finally:
            self.built.set()

    def _sweep(self, recorder: _Recorder, sizes: range) -> None:
        """Every batch size of every variant the warm-up ran: a size inside a graph's guards costs one call;
        one outside them compiles the next graph (dynamo's split, found by running it). A guided batch
        (a U-Net call with labels) has up to two rows per sample."""
        for (path, variant), example in list(recorder.examples.items()):
            top = sizes.stop if not (path == "unet" and variant[0] and sizes.start > 1) else 2 * sizes.stop - 1
            for n in range(sizes.start, top):
                if (path, n, variant) not in self.switch.covered:
                    self._run((path, n, variant), with_rows(example, n))

    def _run(self, sig: Signature, args: tuple[Any, ...]) -> None:
        assert self.compiled is not None
        _check_open(self.switch)
        with torch.inference_mode():
            if sig[0] == "unet":
                self.compiled.eps_model(*args)
            else:
                step_of(self.compiled)(*args)
        self.switch.cover(sig)
        release_free_heap()  # each shape's compile and call leave freed heap: without this the sweep peaked ~260 MiB higher

    def serve_requests(self) -> None:
        """Compile each shape the serving engine met without a graph, until ``switch.close()``."""
        while True:
            request = self.switch.requests.get()
            if request is None:
                return
            sig, args = request
            if self.compiled is None or sig in self.switch.covered:
                continue
            try:
                self._run(sig, args)
                log.info("compiled %s %s rows %s (asked by the serving engine)", sig[0], sig[2], sig[1])
            except CompileStopped:
                return
            except Exception as exc:  # that shape stays eager; the others are unaffected
                self.switch.failed.add(sig)
                log.warning("compiling %s failed (%s); that shape stays eager", sig, compile_failure(exc))
                log.debug("the compile's error in full", exc_info=exc)
