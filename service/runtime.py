"""The server's state (model, engine, metrics, readiness) and the bridge from engine jobs to asyncio."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from ddpm.inference_compile import HotPath, hot_path
from ddpm.model_source import LoadedModel, load_model_source
from kernels.reverse_step import fused_reverse_step
from service.continuous_batcher import Engine, Job
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("ddpm.server")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class FaultInjector:
    """Testing aid (DDPM_FAULT_EVERY_N_ITERATIONS): every Nth call of the wrapped eps model raises."""

    def __init__(self, eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], every: int) -> None:
        self.eps_model = eps_model
        self.every = every
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % self.every == 0:
            raise RuntimeError(f"injected fault (call {self.calls})")
        return self.eps_model(x, t)


class ClientQuota:
    """Images each client has queued or running, bounded by DDPM_MAX_IMAGES_PER_CLIENT."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str, n: int) -> bool:
        with self._lock:
            held = self._held.get(client, 0)
            if held + n > self.limit:
                return False
            self._held[client] = held + n
            return True

    def release(self, client: str, n: int) -> None:
        with self._lock:
            left = self._held.get(client, 0) - n
            if left > 0:
                self._held[client] = left
            else:
                self._held.pop(client, None)

    def held(self, client: str) -> int:
        return self._held.get(client, 0)


class ServerState:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clients = ClientQuota(settings.max_images_per_client)
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.ready = False
        self.load_error: str | None = None
        self._loader: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="ddpm-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._loader is not None:
            self._loader.join(timeout)

    def _load(self) -> None:
        s = self.settings
        try:
            if s.threads:
                torch.set_num_threads(s.threads)
            device = resolve_device(s.device)
            model = load_model_source(s.model, device)
            eager_eps = model.eps_model
            start = time.perf_counter()
            fast = hot_path(eager_eps, model.module, device, s.compile, s.step_backend)
            try:
                engine = self._warm_engine(model, fast)
            except Exception as exc:
                if not (fast.compiled and s.compile == "auto"):
                    raise
                # auto must never cost the service: a model inductor cannot compile is served eagerly
                log.warning("compiled warm-up failed (%s: %s); serving in eager mode", type(exc).__name__, exc)
                fast = hot_path(eager_eps, model.module, device, "off", s.step_backend)
                engine = self._warm_engine(model, fast)
            engine.start()
            self.metrics.model_info.info(
                {
                    "name": model.name,
                    "source": model.source,
                    "device": str(device),
                    "image_shape": "x".join(map(str, model.image_shape)),
                    "num_timesteps": str(model.schedule.num_timesteps),
                    "step_backend": fast.step_backend,
                    "compiled": str(fast.compiled).lower(),
                }
            )
            self.model, self.engine = model, engine
            self.ready = True
            self.metrics.ready.set(1)
            log.info("model %s ready on %s (compile and warm-up %.2f s)", model.name, device, time.perf_counter() - start)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.load_error)

    def _warm_engine(self, model: LoadedModel, fast: HotPath) -> Engine:
        """An engine on the given hot path, warmed up (not started)."""
        s = self.settings
        step_fn = fast.step_fn or functools.partial(fused_reverse_step, backend=fast.step_backend)
        model.eps_model = fast.eps_model
        if s.fault_every_n_iterations:
            model.eps_model = FaultInjector(model.eps_model, s.fault_every_n_iterations)
        engine = Engine(
            model, max_batch=s.max_batch, max_queue=s.max_queue, step_fn=step_fn, observer=self.metrics, scheduling=s.scheduling
        )
        engine.warmup(s.warmup_steps)
        return engine

    def drain(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.engine is not None:
            self.engine.drain()

    def shutdown(self) -> None:
        self.drain()
        if self.engine is not None:
            self.engine.stop()

    def not_ready_reason(self) -> str | None:
        if self.load_error is not None:
            return f"model failed to load: {self.load_error}"
        if self.engine is None:
            return "model is loading"
        if self.engine.draining:
            return "draining"
        if not self.engine.healthy:
            return "the last model call failed"
        return None


@dataclass
class ProgressEvent:
    steps_done: int
    total: int


class JobHandle:
    """A submitted job seen from the event loop: an awaitable result and a stream of progress."""

    def __init__(
        self, job: Job, loop: asyncio.AbstractEventLoop, on_release: Callable[[], None] | None = None, stream: bool = False
    ) -> None:
        self.job = job
        self.done = loop.create_future()
        self._on_release = on_release
        self.progress: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        job.on_done = lambda j: loop.call_soon_threadsafe(self._set_done)
        if stream:  # only a stream reads progress: other jobs must not wake the event loop every iteration
            job.on_progress = lambda j: loop.call_soon_threadsafe(self.progress.put_nowait, ProgressEvent(j.steps_done, j.n * j.steps))

    def _set_done(self) -> None:
        if not self.done.done():
            self.done.set_result(self.job)
            if self._on_release is not None:
                self._on_release()

    async def wait(self, is_disconnected: object, poll_s: float = 0.25) -> Job:
        """The finished job; cancels it when the client goes away (polled every poll_s)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(self.done), poll_s)
            except asyncio.TimeoutError:
                if await is_disconnected():  # type: ignore[operator]
                    self.job.cancel()
                    return await self.done

    async def events(self, min_interval_s: float = 0.1) -> AsyncIterator[ProgressEvent]:
        """Progress, at most one event per min_interval_s, until the job is done."""
        last = 0.0
        while not self.done.done():
            getter = asyncio.ensure_future(self.progress.get())
            finished, _ = await asyncio.wait({getter, self.done}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in finished:
                getter.cancel()
                break
            event = getter.result()
            while not self.progress.empty():
                event = self.progress.get_nowait()
            now = time.monotonic()
            if now - last >= min_interval_s:
                last = now
                yield event
