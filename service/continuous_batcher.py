"""Step-level (continuous) batching of DDPM chains: the engine that owns the model.

One running set of samples, each at its own position in its own (possibly respaced) chain. Every
iteration: admit waiting samples up to ``max_batch`` (round robin over waiting jobs in arrival
order, so a large job cannot starve the small ones behind it), run ONE eps_theta call over the whole
set with per-sample t, apply ONE fused step with per-sample coefficients and Philox seeds, and retire
the samples that reached x_0. A job (one request) is answered when its last image is done.

Image k of a job with seed s always uses Philox key ``image_seed(s, k)`` for x_T and every z, so its
pixels do not depend on which other samples shared its iterations (up to float rounding in the
U-Net's batched kernels).

The engine runs in one thread and knows nothing of HTTP; callbacks tell its caller what happened.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ddpm.model_source import LoadedModel
from ddpm.respace import respace_steps
from ddpm.sampler import ChainTables, StepCoefficients, StepFn, default_step_fn
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor

log = logging.getLogger("ddpm.engine")


class EngineError(RuntimeError):
    """Base class of the reasons a job is refused or fails."""


class QueueFull(EngineError):
    pass


class Draining(EngineError):
    pass


class DeadlineExceeded(EngineError):
    pass


class Cancelled(EngineError):
    pass


class ModelFailure(EngineError):
    pass


@dataclass
class Job:
    """One request: ``n`` images of seed ``seed`` over an S-step chain."""

    seed: int
    n: int
    steps: int
    clip_denoised: bool
    timeout_s: float
    on_progress: Callable[[Job], None] | None = None
    on_done: Callable[[Job], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    created: float = field(default_factory=time.monotonic)
    first_admitted: float | None = None
    finished: float | None = None
    images: torch.Tensor | None = None  # (n, C, H, W) float32 on CPU, filled as images finish
    images_done: int = 0
    steps_done: int = 0  # summed over images; progress = steps_done / (n * steps)
    error: EngineError | None = None
    _pending: collections.deque[int] = field(default_factory=collections.deque)
    _cancelled: bool = False

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def progress(self) -> float:
        return self.steps_done / (self.n * self.steps)

    @property
    def queue_wait(self) -> float | None:
        return None if self.first_admitted is None else self.first_admitted - self.created

    def cancel(self) -> None:
        """Ask the engine to drop this job's samples at its next iteration (thread-safe)."""
        self._cancelled = True


class EngineObserver:
    """Hooks for metrics; every method is called from the engine thread. The default does nothing."""

    def on_iteration(self, batch_size: int, seconds: float) -> None: ...

    def on_admitted(self, job: Job) -> None: ...

    def on_job_done(self, job: Job) -> None: ...

    def on_load(self, queue_depth: int, running: int) -> None: ...


@dataclass
class _Running:
    """The running batch, one row per sample."""

    x: torch.Tensor  # (B, C, H, W)
    positions: torch.Tensor  # (B,) chain position i; the sample is at timestep chain.timesteps[i]
    seeds: torch.Tensor  # (B,) int64 Philox keys
    owners: list[tuple[Job, int]]  # (job, image index k) of each row


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int = 64,
        max_queue: int = 1024,
        step_fn: StepFn | None = None,
        observer: EngineObserver | None = None,
        scheduling: Literal["continuous", "request"] = "continuous",
        idle_poll_s: float = 0.05,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.step_fn = step_fn or default_step_fn()
        self.observer = observer or EngineObserver()
        self.scheduling = scheduling
        self.idle_poll_s = idle_poll_s
        self.device = model.device
        self.shape = model.image_shape
        self._chains: dict[int, ChainTables] = {}
        self._waiting: collections.deque[Job] = collections.deque()  # jobs with images not yet admitted
        self._queued_images = 0
        self._live: set[int] = set()  # ids of jobs submitted and not finished
        self._running: _Running | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.healthy = True
        self.iterations = 0

    # --- public, any thread -----------------------------------------------------------------------
    def chain(self, steps: int) -> ChainTables:
        tables = self._chains.get(steps)
        if tables is None:
            tables = ChainTables(respace_steps(self.model.schedule, steps), self.model.variance_type, self.device)
            self._chains[steps] = tables
        return tables

    def submit(self, job: Job) -> Job:
        if not 1 <= job.steps <= self.model.schedule.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.model.schedule.num_timesteps}")
        with self._lock:
            if self.draining:
                raise Draining("the server is draining and accepts no new work")
            if self._queued_images + job.n > self.max_queue:
                raise QueueFull(f"queue full: {self._queued_images} images waiting, capacity {self.max_queue}")
            self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        job.images = torch.zeros((job.n, *self.shape), dtype=torch.float32)
        job._pending.extend(range(job.n))
        self._waiting.append(job)
        self._queued_images += job.n
        self._live.add(job.id)
        self.observer.on_load(self._queued_images, self.running)
        self._lock.notify_all()

    @property
    def running(self) -> int:
        running = self._running
        return 0 if running is None else len(running.owners)

    @property
    def queue_depth(self) -> int:
        return self._queued_images

    @property
    def idle(self) -> bool:
        return not self._live

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ddpm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self) -> None:
        """Refuse new jobs from now on; the ones already submitted run to completion."""
        with self._lock:
            self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.idle and time.monotonic() < end:
            time.sleep(0.05)
        return self.idle

    def warmup(self, steps: int) -> None:
        """Run short chains through the engine's own iteration code (before start) at batch 1, 2 and
        max_batch, clipped and not, so a compiled hot path has built its graphs before the first request
        (dynamo makes batch 1 its own graph, and may split the dynamic batch range once more)."""
        if steps <= 0:
            return
        observer, self.observer = self.observer, EngineObserver()  # warm-up is not served work: no metrics
        try:
            for n in sorted({1, min(2, self.max_batch), self.max_batch}):
                for clip in (True, False):
                    job = Job(seed=0, n=n, steps=min(steps, self.model.schedule.num_timesteps), clip_denoised=clip, timeout_s=3600)
                    with self._lock:
                        self._enqueue(job)  # not submit(): warm-up ignores the queue limit
                    while not job.done:
                        self._iterate()
                    if job.error is not None:
                        raise job.error
        finally:
            self.observer = observer

    # --- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and self._running is None:
                    self._lock.wait(self.idle_poll_s)
                if self._stop:
                    break
            self._iterate()
        self._fail_all(Cancelled("the engine stopped"))

    @torch.inference_mode()  # every tensor of the running batch is an inference tensor (compiled graphs guard on it)
    def _iterate(self) -> None:
        with self._lock:
            self._drop_dead_jobs()
            self._admit()
            running = self._running
        if running is None:
            return
        start = time.perf_counter()
        try:
            new_x = self._denoise(running)
        except Exception as exc:  # a broken model fails the jobs in the batch, not the engine
            log.exception("model call failed")
            self.healthy = False
            with self._lock:
                self._fail_jobs(list({job.id: job for job, _ in running.owners}.values()), ModelFailure(f"model call failed: {exc}"))
            return
        self.healthy = True
        self.iterations += 1
        self.observer.on_iteration(len(running.owners), time.perf_counter() - start)
        with self._lock:
            self._advance(running, new_x)

    def _denoise(self, running: _Running) -> torch.Tensor:
        """One eps_theta call over the running batch, one fused step per clip setting."""
        b = len(running.owners)
        t = torch.empty(b, dtype=torch.long, device=self.device)
        coefs = torch.empty((len(StepCoefficients.names()), b), dtype=torch.float32, device=self.device)
        clip = torch.tensor([job.clip_denoised for job, _ in running.owners], device=self.device)
        steps = torch.tensor([job.steps for job, _ in running.owners], device=self.device)
        for s in steps.unique().tolist():
            rows = (steps == s).nonzero().flatten()
            tables = self.chain(int(s))
            t[rows] = tables.timesteps[running.positions[rows]]
            coefs[:, rows] = tables.table[:, running.positions[rows]]
        eps = self.model.eps_model(running.x, t)
        out = torch.empty_like(running.x)
        for flag in clip.unique().tolist():
            rows = (clip == flag).nonzero().flatten()
            c = StepCoefficients(*coefs[:, rows].unbind(0))
            out[rows] = self.step_fn(running.x[rows], eps[rows], c, running.seeds[rows], t[rows] + 1, bool(flag))
        return out

    def _advance(self, running: _Running, new_x: torch.Tensor) -> None:
        """Move every sample one step on, retire those at x_0, and tell the jobs."""
        positions = running.positions - 1
        finished = (positions < 0).tolist()
        touched: dict[int, Job] = {}
        for row, (job, k) in enumerate(running.owners):
            job.steps_done += 1
            touched[job.id] = job
            if finished[row]:
                assert job.images is not None
                job.images[k] = new_x[row].float().cpu()
                job.images_done += 1
        keep = [row for row, done in enumerate(finished) if not done]
        self._running = self._select(_Running(new_x, positions, running.seeds, running.owners), keep)
        self.observer.on_load(self._queued_images, self.running)  # before anyone is told: gauges are current
        for job in touched.values():
            if job.images_done == job.n:
                self._finish(job)
            elif job.on_progress is not None:
                job.on_progress(job)

    def _admit(self) -> None:
        free = self.max_batch - self.running
        if self.scheduling == "request" and self._running is not None:
            return  # request-level batching: the batch runs its whole chain before anything joins
        new: list[tuple[Job, int]] = []
        while free > 0 and self._waiting:
            if self.scheduling == "continuous":
                job = self._waiting.popleft()  # round robin: one image per waiting job per turn
                new.append((job, job._pending.popleft()))
                free -= 1
                if job._pending:
                    self._waiting.append(job)
            else:
                job = self._waiting[0]  # first come, first served, whole jobs while they fit
                take = min(free, len(job._pending))
                new.extend((job, job._pending.popleft()) for _ in range(take))
                free -= take
                if not job._pending:
                    self._waiting.popleft()
        if not new:
            return
        self._queued_images -= len(new)
        now = time.monotonic()
        for job, _ in new:
            if job.first_admitted is None:
                job.first_admitted = now
                self.observer.on_admitted(job)
        seeds = seeds_to_tensor([image_seeds(job.seed, 1, first=k)[0] for job, k in new], self.device)
        x_T = sample_noise(seeds, 0, self.shape)  # (N, C, H, W): x_T of each image from its own key
        positions = torch.tensor([job.steps - 1 for job, _ in new], dtype=torch.long, device=self.device)
        if self._running is None:
            self._running = _Running(x_T, positions, seeds, new)
        else:
            r = self._running
            self._running = _Running(
                torch.cat([r.x, x_T]), torch.cat([r.positions, positions]), torch.cat([r.seeds, seeds]), r.owners + new
            )

    # --- removing work -------------------------------------------------------------------------------
    @staticmethod
    def _select(running: _Running, rows: list[int]) -> _Running | None:
        if not rows:
            return None
        if len(rows) == len(running.owners):
            return running
        idx = torch.tensor(rows, dtype=torch.long, device=running.x.device)
        return _Running(running.x[idx], running.positions[idx], running.seeds[idx], [running.owners[r] for r in rows])

    def _drop_dead_jobs(self) -> None:
        now = time.monotonic()
        for job in self._jobs_in_flight():
            if job._cancelled:
                self._fail_jobs([job], Cancelled("the client went away"))
            elif now > job.deadline:
                self._fail_jobs([job], DeadlineExceeded(f"deadline of {job.timeout_s:g} s exceeded"))

    def _jobs_in_flight(self) -> list[Job]:
        jobs = {job.id: job for job in self._waiting}
        if self._running is not None:
            jobs.update({job.id: job for job, _ in self._running.owners})
        return list(jobs.values())

    def _fail_jobs(self, jobs: list[Job], error: EngineError) -> None:
        ids = set()
        for job in jobs:
            ids.add(job.id)
            self._queued_images -= len(job._pending)
            job._pending.clear()
            job.error = error
        self._waiting = collections.deque(j for j in self._waiting if j.id not in ids)
        if self._running is not None:
            keep = [row for row, (job, _) in enumerate(self._running.owners) if job.id not in ids]
            self._running = self._select(self._running, keep)
        self.observer.on_load(self._queued_images, self.running)
        for job in jobs:
            self._finish(job)

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            self._fail_jobs(self._jobs_in_flight(), error)

    def _finish(self, job: Job) -> None:
        if job.done:
            return
        job.finished = time.monotonic()
        self._live.discard(job.id)
        self.observer.on_job_done(job)
        if job.on_done is not None:
            job.on_done(job)
