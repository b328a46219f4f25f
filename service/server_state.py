"""One replica's state: the model and its measured facts, the engine on its hot path, metrics, cache and readiness.

Threads: while a replica serves, torch's parallel work runs on the engine thread only, and on the loader
and compile threads, which end. A request thread that ran one parallel torch op would keep an OpenMP
thread team of its own for its life, and with more OpenMP threads than CPUs GNU OpenMP stops spinning
between parallel regions: every later U-Net op of the engine pays a futex wake-up (batch-1 latency 0.20 s
-> 0.48 s on a 2-core CPU after one GET /info counted FLOPs on a request thread; BENCHMARKS.md, "Peers").
So the FLOPs are counted here on the loader thread before the warm-up, request threads encode PNGs and decode uploads in
numpy, and tests/test_torch_threads.py counts the process's native threads around such requests.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path

import torch

from ddpm import __version__, compile_cache
from ddpm.chain import EpsModel, StepFn
from ddpm.compile_cache import artefact_path, machine_key
from ddpm.cpu_quota import set_torch_threads
from ddpm.image_inputs import MIN_INPUT_BYTES, base64_chars, max_input_bytes
from ddpm.inference_compile import HotPath, hot_path, should_compile
from ddpm.loaded_model import LoadedModel
from ddpm.model_facts import ModelFacts, flops_per_image_step, model_fingerprint, parameter_count, weights_mtime, weights_sha256
from ddpm.model_hub import model_name
from ddpm.model_source import load_unchanged
from ddpm.precision import resolve_precision
from service.api.in_flight import InFlightRequests
from service.client_quota import ClientQuota
from service.engine.background_compile import COMPILED, EAGER, GROUPS, BackgroundCompiler, PathSwitch, fully_compiled, step_of
from service.engine.engine import Engine
from service.engine.errors import EngineStopped
from service.fault_injection import FaultInjector
from service.metrics import Metrics
from service.response_cache import ResponseCache
from service.settings import Settings
from service.tracing import RequestTracer

log = logging.getLogger("ddpm.server")
RECOVERING = "recovering from a failed iteration (self-test pending)"
# per request (service/api/drain_admission.py): the first request of a connection accepted before the listeners closed
ROUTED_BEFORE_DRAIN: ContextVar[bool] = ContextVar("routed_before_drain", default=False)
OTHER_FIELDS_BYTES = 16 * 2**10  # a request's fields besides its image and mask (a data: URL prefix and line breaks too)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _file_facts(model: LoadedModel) -> tuple[str, int | None, str]:
    """The weights' SHA-256 and time written, and the fingerprint naming the model's images (ETags, the response cache)."""
    sha = weights_sha256(model.path) if model.path is not None else ""
    written = weights_mtime(model.path) if model.path is not None else None
    return sha, written, model_fingerprint(model, sha, __version__)


class ServerState:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(model=model_name(settings.model))
        self.clients = ClientQuota(settings.max_images_per_client, settings.max_calls_per_client)
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.facts: ModelFacts | None = None
        self.cache = ResponseCache(int(settings.response_cache_mb * 2**20))
        self.tracer: RequestTracer | None = None  # the app's (DDPM_OTLP_TRACES_ENDPOINT) unless one is set here (the tests')
        self.metrics.watch_cache(lambda: self.cache.size_bytes)
        self.in_flight = InFlightRequests()  # identical requests share a job while its images are made
        self.precision = "fp32"  # the U-Net's concrete precision once loaded (DDPM_PRECISION resolved)
        self.hot_path: HotPath | None = None  # the path served when it is fixed (compiled before ready, or eager only)
        self.switch: PathSwitch | None = None  # per call shape: the compiled graphs where built, else eager
        self.compiler: BackgroundCompiler | None = None  # builds the graphs, on its own thread
        self.compile_thread: threading.Thread | None = None
        self.compiled_key: dict[str, object] | None = None  # names this machine's copy in DDPM_COMPILE_CACHE_DIR
        self.reuse_compiled: tuple[Path, ...] = ()  # more directories an earlier version's copy may seed from (compile-cache --reuse)
        self.failed_copy: Path | None = None  # a copy of compiled graphs that was loaded and failed (replaced when saved)
        self.ready = False
        self.draining = False
        self.listeners_closed: float | None = None  # when the draining server stopped accepting connections
        self.load_error: str | None = None
        self.stalled: str | None = None  # set by the watchdog when the engine stops making progress
        self._loader: threading.Thread | None = None
        self.faults = FaultInjector(
            every_n=settings.fault_every_n_iterations,
            rate=settings.fault_rate,
            stages=settings.fault_stage_list,
            seed=settings.fault_seed,
            duration_s=settings.fault_duration_s,
            stall_s=settings.fault_stall_s,
        )
        # called (from any thread) when the server cannot go on: the model failed to load or the engine
        # thread died; `ddpm serve` exits non-zero so that the orchestrator restarts the process
        self.on_fatal: Callable[[str], None] | None = None
        self.metrics.ready.set_function(lambda: 1.0 if self.not_ready_reason() is None else 0.0)  # always what /readyz says

    # --- lifecycle ---------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="ddpm-loader", daemon=True)
        self._loader.start()

    @property
    def loading(self) -> bool:
        """The loader thread is still loading the model or warming it up (inside torch, most of the time)."""
        return self._loader is not None and self._loader.is_alive()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._loader is not None:
            self._loader.join(timeout)

    def _load(self) -> None:
        try:
            self._load_and_serve()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.load_error, exc_info=exc)
            self._fatal(f"model failed to load: {self.load_error}")

    def _set_threads(self) -> None:
        """DDPM_THREADS, or PyTorch's default capped at the cgroup's CPU quota (``ddpm.cpu_quota``)."""
        capped = set_torch_threads(self.settings.threads)
        if capped:
            log.info("%s; DDPM_THREADS sets it", capped)

    def _load_and_serve(self) -> None:
        """Load the model, measure its facts, warm an engine on its hot path, start it, turn ready."""
        s = self.settings
        self._set_threads()
        sys.setswitchinterval(s.gil_switch_interval_ms / 1e3)  # process-wide (benchmarks/neighbour_load.py)
        device = resolve_device(s.device)
        model, (sha, written, fingerprint) = load_unchanged(s.model, device, _file_facts)  # what its hash names is what runs
        gflop = self._count_flops(model.eps_model, model)  # here, before anything else runs torch (see "Threads" above)
        start = time.perf_counter()
        engine, fast = self._engine_on_hot_path(model, device, fingerprint)
        if self.faults.enabled:
            engine.faults = self.faults
            self.faults.arm()  # after warm-up: start-up itself never fails on purpose
        if self.draining:  # stopped during the start (SIGTERM, Ctrl-C): no engine thread to outlive the shutdown
            log.info("stopped before ready: the engine was not started")
            return
        engine.start()
        threading.Thread(target=self._watch, args=(engine,), name="ddpm-watchdog", daemon=True).start()
        self.metrics.watch_backlog(engine.backlog_seconds)
        self.metrics.watch_call_size(lambda: engine.call_size.best)
        self.metrics.watch_answer_reserve(lambda: engine.answer_time.reserve_s)
        if device.type == "cuda":
            self.metrics.watch_gpu(device)
        self.facts = ModelFacts(sha, fingerprint, parameter_count(model.module), str(device), written or int(time.time()), gflop)
        self.model, self.engine, self.precision = model, engine, fast.precision
        self._publish_hot_path()
        self.ready = True
        mode = "eager" if self.switch is None else "compiled" if fully_compiled(self.switch.states) else "eager, compiling behind"
        log.info(
            "model %s ready on %s, U-Net in %s (setting %s; %s; load and warm-up %.2f s)",
            model.name, device, fast.precision, s.precision, mode, time.perf_counter() - start,
        )  # fmt: skip
        if self.compiler is not None and self.compile_thread is None:
            self.compile_thread = self.compiler.start()

    def _engine_on_hot_path(self, model: LoadedModel, device: torch.device, fingerprint: str) -> tuple[Engine, HotPath]:
        """A warmed engine and the path it serves. Where a compiler exists the engine serves through a
        PathSwitch (service/engine/background_compile.py): eager for any shape without a compiled graph,
        never a compile on its thread. compile=auto: ready on the eager path in seconds, graphs built
        behind it; compile=on or DDPM_COMPILE_BEFORE_READY: the graphs are built before ready."""
        s, eager_eps = self.settings, model.eps_model
        eager = hot_path(eager_eps, model.module, device, "off", s.step_backend, s.precision)
        if not should_compile(s.compile, device):
            self.hot_path = eager
            return self._warm_engine(model, eager.eps_model, step_of(eager), *self._eager_warmup(device, compiling=False)), eager
        switch = self.switch = PathSwitch(eager)
        engine = self._warm_engine(model, switch.eps, switch.step, *self._eager_warmup(device, compiling=True))
        switch.on_change = lambda _: self._publish_hot_path()
        switch.on_fallback = lambda sig: self.metrics.compile_fallbacks.labels(path=sig[0]).inc()
        self.compiler = BackgroundCompiler(
            model,
            switch,
            make_compiled=lambda eps, module: hot_path(eps, module, device, s.compile, s.step_backend, s.precision, s.cuda_graphs),
            make_engine=lambda m, step: Engine(m, max_batch=s.max_batch, step_fn=step, scheduling=s.scheduling),
            warmup_steps=s.warmup_steps,
            max_batch=s.max_batch,
            before_build=lambda: self._load_compiled(device, fingerprint),
            drop_loaded=self._drop_loaded_compiled,
            on_done=lambda: self._save_compiled(self.compiled_key),
        )
        if s.compile == "on" or s.compile_before_ready:
            # on this (loader) thread, before ready; compile=on fails the start if it cannot compile, auto serves eagerly
            self.compiler.build(raise_errors=s.compile == "on")
            self.compile_thread = self.compiler.start(initial=False)
        return engine, eager

    def _eager_warmup(self, device: torch.device, compiling: bool) -> tuple[set[int], set[int]]:
        """The eager path's warm-up before ready: the batch sizes of every step variant, and those of the U-Net's shapes
        alone (Engine.warmup). Where graphs are built behind ready, batch 1 and 2 prove the model runs (the compile
        thread warms the rest); where nothing compiles, max_batch too. On a CPU no JIT runs on this path, so every
        variant at batch 1 and the others as shapes only (the shipped model compile off, 2-core AVX2: ready 13.7 ->
        6.1 s); on CUDA every variant at every size (Triton specialises its kernel on the sizes it is launched with)."""
        sizes = {1, min(2, self.settings.max_batch)} | (set() if compiling else {self.settings.max_batch})
        return ({1}, sizes - {1}) if device.type == "cpu" else (sizes, set())

    def _load_compiled(self, device: torch.device, fingerprint: str) -> None:
        """Before the first compile, on the thread that compiles (behind ready, unless compiling before it): this
        machine's graphs from DDPM_COMPILE_CACHE_DIR into the local inductor cache. Only where a directory is set: the
        key imports inductor and runs its ISA check (g++ and a Python process per ISA), 7-8 s before ready in every
        container on a 2-core AVX2 CPU while it ran on the loader (its inductor cache starts empty)."""
        s = self.settings
        if s.compile_cache_dir is None:
            return
        try:
            self.compiled_key = machine_key(device, resolve_precision(s.precision, device), fingerprint)
            log.info("%s", compile_cache.load(s.compile_cache_dir, self.compiled_key, self.reuse_compiled))
        except Exception as exc:  # a copy that cannot be read: compiled from scratch, as on a machine without one
            log.warning("could not load the compiled graphs: %s: %s", type(exc).__name__, exc)

    def _drop_loaded_compiled(self) -> Path | None:
        """The compile failed: the copy loaded from DDPM_COMPILE_CACHE_DIR (if any) out of the local cache again, and
        remembered as failed, so that the compile's own graphs replace it."""
        self.failed_copy = compile_cache.drop_loaded()
        return self.failed_copy

    def _save_compiled(self, key: dict[str, object] | None) -> None:
        """Write the compiled graphs to DDPM_COMPILE_CACHE_DIR when this machine has no intact copy there yet, or the
        one there failed to load."""
        directory = self.settings.compile_cache_dir
        if directory is None or key is None:
            return
        copy = artefact_path(directory, key)
        replace = self.failed_copy == copy
        if copy.exists() and compile_cache.intact(copy) and not replace:
            compile_cache.unwatch()  # its copy is there: nothing to write, nothing more to watch
            return
        try:
            path = compile_cache.save(directory, key, replace=replace)
        except Exception as exc:  # never the service's concern
            log.warning("could not save the compiled graphs: %s: %s", type(exc).__name__, exc)
            return
        if path is not None:
            log.info("compiled graphs written to %s", path)

    def _fatal(self, reason: str) -> None:  # readiness follows from fatal_reason(); nothing to set here
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _engine_died(self, reason: str) -> None:
        self._fatal(f"engine stopped: {reason}")

    def _watch(self, engine: Engine) -> None:
        """Watchdog: a device call that hangs never raises, so nothing else would notice. Past the stall
        timeout (which /healthz reads live, ``stall_reason``) the requests in flight are answered with 503
        and the process exits 1 (``on_fatal``): the orchestrator starts a fresh one."""
        period = min(1.0, self.settings.stall_timeout_s / 4)
        while engine.alive:
            reason = self.stall_reason()
            if reason is not None:
                self.stalled = reason
                log.critical("engine stalled: %s", reason)
                answered = engine.abort(EngineStopped("the engine stalled and this replica is restarting; retry"), lock_timeout=1.0)
                log.critical("answered %d request(s) in flight with 503", answered)
                self._fatal(f"engine stalled: {reason}")
                return
            time.sleep(period)

    def stall_reason(self) -> str | None:
        """Why the engine counts as stalled now (work waiting, no iteration finished for over
        DDPM_STALL_TIMEOUT_S), or None."""
        if self.stalled is not None:
            return self.stalled
        stalled = 0.0 if self.engine is None else self.engine.stalled_for()
        if stalled > self.settings.stall_timeout_s:
            return f"no iteration finished for {stalled:.0f} s with work waiting"
        return None

    def _warm_engine(self, model: LoadedModel, eps_model: EpsModel, step_fn: StepFn, sizes: set[int],
                     shape_sizes: Iterable[int] = ()) -> Engine:  # fmt: skip
        """An engine on the given hot path, warmed up (not started)."""
        s = self.settings
        model.eps_model = eps_model
        # request-level batching runs a batch's whole chain: nothing more than one call's rows resident
        resident = s.max_batch if s.scheduling == "request" else (s.max_resident or 4 * s.max_batch)
        engine = Engine(
            model,
            max_batch=s.max_batch,
            max_queue=s.max_queue,
            step_fn=step_fn,
            observer=self.metrics,
            scheduling=s.scheduling,
            on_dead=self._engine_died,
            max_resident=resident,
            max_slowdown=s.max_slowdown,
            tune_call_size=s.tune_call_size,
            deadline_margin_s=s.deadline_margin_s,
        )
        engine.warmup(s.warmup_steps, sizes, shape_sizes)
        return engine

    def hot_path_states(self) -> dict[str, str]:
        """Per batch-size group ("1", "2+"): eager, compiling, compiled or failed."""
        if self.switch is not None:
            return dict(self.switch.states)
        compiled = self.hot_path is not None and self.hot_path.compiled
        return dict.fromkeys(GROUPS, COMPILED if compiled else EAGER)

    def compiled_batches(self) -> dict[str, str]:
        """The batch sizes with compiled graphs, per call variant (empty when nothing compiles)."""
        return {} if self.switch is None else self.switch.compiled_batches()

    def compile_fallbacks(self) -> int:
        """Calls run eagerly because no graph covered their shape yet (compiles the serving thread did not do)."""
        return 0 if self.switch is None else self.switch.recompiles_avoided

    def step_backend(self) -> str:
        """The step's concrete backend for a running batch (the 2+ group's)."""
        path = self.switch.path("2+") if self.switch is not None else self.hot_path
        return path.step_backend if path is not None else ""

    def _publish_hot_path(self) -> None:
        model, states = self.model, self.hot_path_states()
        if model is None or self.facts is None:
            return
        for group, state in states.items():
            self.metrics.hot_path_compiled.labels(batch=group).set(1.0 if state == COMPILED else 0.0)
        for variant, sizes in self.compiled_batches().items():
            self.metrics.compiled_batch_sizes.labels(variant=variant).set(sum(_count(part) for part in sizes.split(",") if part))
        self.metrics.model_info.info(
            {
                "name": model.name,
                "source": model.source,
                "device": self.facts.device,
                "image_shape": "x".join(map(str, model.image_shape)),
                "num_timesteps": str(model.schedule.num_timesteps),
                "step_backend": self.step_backend(),
                "compiled": str(fully_compiled(states)).lower(),
                "precision": self.precision,
                "weights_sha256": self.facts.weights_sha256,
                "fingerprint": self.facts.fingerprint,
            }
        )

    @staticmethod
    def _count_flops(eps_model: EpsModel, model: LoadedModel) -> float | None:
        """One U-Net call on one image, counted by the loader before the warm-up (~0.05 s on the shipped model,
        2-core AVX2 EPYC; 1.8 s more while the count's dispatch mode imported torch._dynamo). Not after ready: run
        beside the background compile it broke dynamo's tracing, and a replica stopped during it aborted at exit (both
        seen in CI)."""
        try:
            return flops_per_image_step(eps_model, model.image_shape, model.device) / 1e9
        except Exception as exc:  # an op the counter cannot trace: /info says null, serving goes on
            log.warning("cannot count the U-Net's FLOPs: %s: %s", type(exc).__name__, exc)
            return None

    def routed_before_drain(self, connection_opened: float | None, nth_on_connection: int | None) -> bool:
        """Whether a request is the first on a connection accepted before this replica closed its listeners
        (``listeners_closed``, set by the draining server; None while they are open). A load balancer routed it
        here before the drain and does not re-send a POST that reached a replica (nginx's
        ``proxy_next_upstream error timeout``), so a draining replica serves it rather than answer 503; later
        requests on a kept-alive connection get 503 + Retry-After and go elsewhere."""
        if nth_on_connection != 1 or connection_opened is None:
            return False
        return self.listeners_closed is None or connection_opened <= self.listeners_closed

    def drain(self) -> None:
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    def shutdown(self) -> None:
        self.drain()
        if self.switch is not None:
            self.switch.close()  # the compile thread stops waiting for shapes to build
        if self.engine is not None:
            self.engine.stop(timeout=1.0 if self.stall_reason() is not None else 10.0)  # a stalled thread may never join

    def fatal_reason(self) -> str | None:
        """Why this process can never serve (it exits; /healthz fails too), or None. The reason the
        open probes give is generic: paths and exception text go to the log, not to anonymous callers."""
        if self.load_error is not None:
            return "model failed to load (see the server log)"
        if self.engine is not None and self.engine.dead is not None:
            return "engine stopped (see the server log)"
        if self.stall_reason() is not None:
            return "engine stalled (see the server log)"
        return None

    def not_ready_reason(self) -> str | None:
        fatal = self.fatal_reason()
        if fatal is not None:
            return fatal
        if self.draining or (self.engine is not None and self.engine.draining):
            return "draining"
        if self.engine is None or not self.ready:
            return "model is loading"
        if not self.engine.healthy:
            return RECOVERING
        return None

    def max_input_bytes(self) -> int:
        """The bytes one input image or mask may have, from the model's shape (the floor until it has loaded)."""
        return MIN_INPUT_BYTES if self.model is None else max_input_bytes(self.model.image_shape)

    def max_body_bytes(self) -> int:
        """The request body limit: DDPM_MAX_BODY_BYTES, else room for the model's largest image and mask in
        base64 and the other fields (a body the schema allows is never refused for its size)."""
        if self.settings.max_body_bytes is not None:
            return self.settings.max_body_bytes
        return 2 * base64_chars(self.max_input_bytes()) + OTHER_FIELDS_BYTES

    def refusal_reason(self) -> str | None:
        """Why a new request is refused with 503, or None. A recovering engine still takes work:
        the next good iteration is what heals it; so does a draining one, for a request routed here before
        the drain (``ROUTED_BEFORE_DRAIN``, set by ``service.api.drain_admission``)."""
        reason = self.not_ready_reason()
        return None if reason == RECOVERING or (reason == "draining" and ROUTED_BEFORE_DRAIN.get()) else reason


def _count(part: str) -> int:
    """How many sizes one part of a range list holds ('3' or '2-15')."""
    low, _, high = part.partition("-")
    return int(high or low) - int(low) + 1
