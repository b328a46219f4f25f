"""Step-level (continuous) batching of DDPM chains: the engine that owns the model.

One running set of samples, each at its own position in its own (possibly respaced) chain. Every
iteration: admit waiting samples up to ``max_batch`` (round robin over clients, then over each
client's jobs, one image a turn: a client that floods the queue cannot make another client's single
request wait behind its backlog, and a large job cannot starve the small ones behind it), run ONE
eps_theta call over the whole set with per-sample t, apply ONE fused step with per-sample
coefficients and Philox seeds, and retire the samples that reached x_0. A job (one request) is
answered when its last image is done.

Faults: an exception in any stage of an iteration (admit, U-Net, step, advance) fails exactly the
jobs that stage touched, is logged with their request ids, and the engine goes on; it then reports
itself unhealthy until an iteration succeeds, and when idle runs a one-sample self-test with
exponential backoff, so readiness heals without traffic. A failing observer (metrics hook) or job
callback is logged and isolated. If the engine thread ends anyway, every waiting job is answered
(``EngineStopped``) and ``on_dead`` tells the owner, which exits so the orchestrator restarts it.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ddpm.chain import ChainSpec, ChainTables, StepCoefficients, StepFn, default_step_fn
from ddpm.guidance import guided_eps
from ddpm.loaded_model import LoadedModel
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor

log = logging.getLogger("ddpm.engine")

CHAIN_CACHE = 256  # coefficient tables kept (8 x S float32 each; at most 32 KB at S = 1000)


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


class EngineFault(EngineError):
    """An exception inside one stage of an iteration; fails the jobs that stage touched."""

    def __init__(self, stage: str, exc: BaseException, what: str | None = None) -> None:
        self.stage = stage
        self.cause = f"{type(exc).__name__}: {exc}"
        # the client sees the stage and the exception type; the message (paths, sizes) goes to the log only
        what = what or f"the engine's {stage} stage"
        super().__init__(f"{what} failed ({type(exc).__name__}); the server log has the details")


class ModelFailure(EngineFault):
    """The U-Net call or the fused step raised."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(stage, exc, "model call" if stage == "unet" else "denoising step")


class EngineStopped(EngineError):
    """The engine thread ended (a bug or a fatal fault): the job was not run; another replica can."""


class DrainTimeout(EngineError):
    """The server is shutting down and its drain deadline passed before the job finished."""


@dataclass
class Job:
    """One request: ``n`` images of seed ``seed`` over an S-step chain of one sampler."""

    seed: int
    n: int
    steps: int
    clip_denoised: bool
    timeout_s: float
    sampler: str = "ddpm"
    eta: float = 0.0
    spacing: str = "linspace"
    steps_offset: int = 0
    # a class-conditional model's label per image (None: unconditional, the null label) and the
    # classifier-free guidance scale w of every image (0: no guidance, one U-Net row per step)
    class_labels: tuple[int, ...] | None = None
    guidance_scale: float = 0.0
    client: str = ""  # who the job counts against: admission is round robin over clients
    request_id: str | None = None  # for the log lines of faults
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
    # the chain's key (tables, grouping per iteration), built once: the engine reads it every iteration
    chain: ChainSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.chain = ChainSpec(self.steps, self.sampler, self.eta, self.clip_denoised, self.spacing, self.steps_offset)

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

    def on_fault(self, stage: str, jobs: int) -> None: ...


@dataclass
class _Running:
    """The running batch, one row per sample."""

    x: torch.Tensor  # (B, C, H, W)
    positions: torch.Tensor  # (B,) chain position i; the sample is at timestep chain.timesteps[i]
    seeds: torch.Tensor  # (B,) int64 Philox keys
    owners: list[tuple[Job, int]]  # (job, image index k) of each row
    # (B, C, H, W) float32: each row's previous x0_hat, while any row runs a multistep sampler (zeros
    # for the others, whose x0_prev weight is 0); None otherwise, so single-step batches pay nothing
    x0_prev: torch.Tensor | None = None


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
        self_test_backoff_s: tuple[float, float] = (1.0, 30.0),
        faults: Callable[[str], None] | None = None,
        on_dead: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.step_fn = step_fn or default_step_fn()
        self.observer = observer or EngineObserver()
        self.scheduling = scheduling
        self.idle_poll_s = idle_poll_s
        self.faults = faults  # testing aid (service.fault_injection): called with each stage's name
        self.on_dead = on_dead
        self.device = model.device
        self.shape = model.image_shape
        self._chains: collections.OrderedDict[ChainSpec, ChainTables] = collections.OrderedDict()  # LRU
        # client -> its jobs with images not yet admitted (arrival order); clients in turn order
        self._waiting: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._queued_images = 0
        self._live: set[int] = set()  # ids of jobs submitted and not finished
        self._running: _Running | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.healthy = True
        self.dead: str | None = None  # why the engine thread ended, when it ended on a fault
        self.iterations = 0
        self._last_progress = time.monotonic()  # the end of the last iteration attempt (or the last idle moment)
        self._backoff_first, self._backoff_max = self_test_backoff_s
        self._backoff = self._backoff_first
        self._next_self_test = 0.0
        self.self_tests = 0

    # --- public, any thread -----------------------------------------------------------------------
    def chain(self, spec: ChainSpec) -> ChainTables:
        """The tables of one chain, built once and kept (the most recent CHAIN_CACHE of them; eta is a float)."""
        tables = self._chains.get(spec)
        if tables is None:
            tables = ChainTables.for_spec(self.model.schedule, self.model.variance_type, spec, self.device)
            self._chains[spec] = tables
            while len(self._chains) > CHAIN_CACHE:
                self._chains.popitem(last=False)
        else:
            self._chains.move_to_end(spec)
        return tables

    def submit(self, job: Job) -> Job:
        self.chain(job.chain)  # a chain the schedule cannot make (steps outside 1..T, an offset past T) fails here, not in the engine
        with self._lock:
            if self.dead is not None or self._stop:
                raise EngineStopped("the engine has stopped")
            if self.draining:
                raise Draining("the server is draining and accepts no new work")
            if self._queued_images + job.n > self.max_queue:
                raise QueueFull(f"queue full: {self._queued_images} images waiting, capacity {self.max_queue}")
            self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        job.images = torch.zeros((job.n, *self.shape), dtype=torch.float32)
        job._pending.extend(range(job.n))
        self._waiting.setdefault(self._turn_key(job), collections.deque()).append(job)
        self._queued_images += job.n
        self._live.add(job.id)
        self._observe("on_load", self._queued_images, self.running)
        self._lock.notify_all()

    def _turn_key(self, job: Job) -> str:
        # request-level batching is first come, first served over everyone: one queue
        return job.client if self.scheduling == "continuous" else ""

    def images_ahead(self, job: Job) -> int | None:
        """Images of earlier requests still waiting for a slot (the job's queue position, counted in
        images), or None once the job's first image has joined the running batch."""
        with self._lock:
            if job.first_admitted is not None or job.done:
                return None
            return sum(len(other._pending) for jobs in self._waiting.values() for other in jobs if other.id < job.id)

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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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

    def abort(self, error: EngineError) -> int:
        """Answer every job in flight with ``error`` now (the drain deadline); returns how many.
        Safe while an iteration runs: the engine drops rows of finished jobs when it advances."""
        with self._lock:
            jobs = self._jobs_in_flight()
            self._fail_jobs(jobs, error)
        return len(jobs)

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.idle and time.monotonic() < end:
            time.sleep(0.05)
        return self.idle

    def warmup(self, steps: int, sizes: Iterable[int] | None = None) -> None:
        """Run short chains through the engine's own iteration code (before start) at batch 1, 2 and
        max_batch (or ``sizes``), clipped and not, so a compiled hot path has built its graphs before it
        serves (dynamo makes batch 1 its own graph, and may split the dynamic batch range once more)."""
        if steps <= 0:
            return
        observer, self.observer = self.observer, EngineObserver()  # warm-up is not served work: no metrics
        try:
            for n in sorted(set(sizes) if sizes is not None else {1, min(2, self.max_batch), self.max_batch}):
                for clip, sampler in ((True, "ddpm"), (False, "ddpm"), (True, "dpmsolver++")):  # with and without x0_prev
                    guided = self.model.conditional and sampler == "dpmsolver++"  # and a guided batch (2 rows per sample)
                    job = Job(
                        seed=0,
                        n=n,
                        steps=min(steps, self.model.schedule.num_timesteps),
                        clip_denoised=clip,
                        timeout_s=3600,
                        sampler=sampler,
                        class_labels=(0,) * n if guided else None,
                        guidance_scale=1.0 if guided else 0.0,
                    )
                    with self._lock:
                        self._enqueue(job)  # not submit(): warm-up ignores the queue limit
                    while not job.done:
                        self._iterate()
                    if job.error is not None:  # the cause, not the client-facing message: this goes to the log
                        raise RuntimeError(f"warm-up failed: {getattr(job.error, 'cause', job.error)}") from job.error
        finally:
            self.observer = observer

    # --- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        error: EngineError = Cancelled("the engine stopped")
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._has_work() and not self._self_test_due():
                        self._last_progress = time.monotonic()  # idle is not stalled
                        self._lock.wait(self.idle_poll_s)
                    if self._stop:
                        break
                    work = self._has_work()
                self._fault("loop")
                if work:
                    self._iterate()
                else:
                    self._self_test()
                self._last_progress = time.monotonic()
        except BaseException as exc:  # the last line of defence: nothing may end the engine silently
            self.dead = f"{type(exc).__name__}: {exc}"
            error = EngineStopped("the engine stopped after an internal error; retry (another replica can serve it)")
            log.critical("engine thread died", exc_info=exc, extra={"fields": {"error": self.dead}})
        finally:
            self._fail_all(error)
            if self.dead is not None and self.on_dead is not None:
                self.on_dead(self.dead)

    def _has_work(self) -> bool:
        return bool(self._waiting) or self._running is not None

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing an iteration (0 when idle or moving):
        a device call that never returns shows here, since it cannot raise."""
        if not self._has_work():
            return 0.0
        return max(0.0, time.monotonic() - self._last_progress)

    def _self_test_due(self) -> bool:
        return not self.healthy and time.monotonic() >= self._next_self_test

    def _fault(self, stage: str) -> None:
        if self.faults is not None:
            self.faults(stage)

    @torch.inference_mode()  # every tensor of the running batch is an inference tensor (compiled graphs guard on it)
    def _iterate(self) -> None:
        with self._lock:
            self._drop_dead_jobs()
            new = self._take_waiting()
        if new:
            try:
                self._fault("admit")
                self._start(new)
            except Exception as exc:
                self._on_fault("admit", exc, [job for job, _ in new])
                return
        with self._lock:
            running = self._running
        if running is None:
            return
        start = time.perf_counter()
        jobs = [job for job, _ in running.owners]
        try:
            t, coefs, eps = self._eps(running)
        except Exception as exc:  # a broken model fails the jobs in the batch, not the engine
            self._on_fault("unet", exc, jobs)
            return
        try:
            new_x, x0 = self._step(running, eps, t, coefs)
        except Exception as exc:
            self._on_fault("step", exc, jobs)
            return
        seconds = time.perf_counter() - start
        try:
            with self._lock:
                self._fault("advance")
                self._advance(running, new_x, x0, seconds)
        except Exception as exc:
            self._on_fault("advance", exc, jobs)
            return
        self._healed("an iteration succeeded")

    @torch.inference_mode()
    def _self_test(self) -> None:
        """One sample's last step through the U-Net and the fused step, off the books (no job, no
        metrics): readiness heals when the model works again, without waiting for traffic."""
        self.self_tests += 1
        probe = Job(seed=0, n=1, steps=1, clip_denoised=True, timeout_s=60)
        seeds = seeds_to_tensor([image_seeds(0, 1)[0]], self.device)
        running = _Running(sample_noise(seeds, 0, self.shape), torch.zeros(1, dtype=torch.long, device=self.device), seeds, [(probe, 0)])
        try:
            t, coefs, eps = self._eps(running)
            out, _ = self._step(running, eps, t, coefs)
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError("self-test produced non-finite values")
        except Exception as exc:
            self._backoff = min(self._backoff * 2, self._backoff_max)
            self._next_self_test = time.monotonic() + self._backoff
            log.warning("self-test failed; next in %.1f s", self._backoff, extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
            return
        self._healed("self-test passed")

    def _healed(self, why: str) -> None:
        if not self.healthy:
            log.info("engine healthy again: %s", why)
        self.healthy = True
        self._backoff = self._backoff_first

    def _on_fault(self, stage: str, exc: Exception, jobs: list[Job]) -> None:
        """Fail exactly ``jobs`` (the ones the failed stage touched), log it, and go on."""
        unique = list({job.id: job for job in jobs if not job.done}.values())
        fields = {
            "stage": stage,
            "error": f"{type(exc).__name__}: {exc}",
            "request_ids": [job.request_id for job in unique if job.request_id],
            "jobs": len(unique),
        }
        log.error("engine fault in stage %s: %d job(s) failed", stage, len(unique), exc_info=exc, extra={"fields": fields})
        if self.healthy:
            self.healthy = False
            self._backoff = self._backoff_first
            self._next_self_test = time.monotonic() + self._backoff
        error = ModelFailure(stage, exc) if stage in ("unet", "step") else EngineFault(stage, exc)
        self._observe("on_fault", stage, len(unique))  # counted before anyone is told
        with self._lock:
            self._fail_jobs(unique, error)

    def _observe(self, hook: str, *args: object) -> None:
        """Call an observer hook; a failing one is logged and isolated (metrics are not the product)."""
        try:
            if hook != "on_fault":
                self._fault("observer")
            getattr(self.observer, hook)(*args)
        except Exception as exc:
            log.error("observer hook %s failed", hook, exc_info=exc, extra={"fields": {"stage": "observer", "hook": hook}})
            if hook != "on_fault":
                try:
                    self.observer.on_fault("observer", 0)
                except Exception:
                    pass

    def _eps(self, running: _Running) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample t (B,) and step coefficients (8, B) from each sample's own chain tables, and
        ONE eps_theta call over the running batch."""
        b = len(running.owners)
        t = torch.empty(b, dtype=torch.long, device=self.device)
        coefs = torch.empty((len(StepCoefficients.names()), b), dtype=torch.float32, device=self.device)
        groups: dict[ChainSpec, list[int]] = {}
        for row, (job, _) in enumerate(running.owners):
            groups.setdefault(job.chain, []).append(row)
        for spec, members in groups.items():
            rows = torch.tensor(members, dtype=torch.long, device=self.device)
            tables = self.chain(spec)
            t[rows] = tables.timesteps[running.positions[rows]]
            coefs[:, rows] = tables.table[:, running.positions[rows]]
        self._fault("unet")
        if not self.model.conditional:
            return t, coefs, self.model.eps_model(running.x, t)
        # classifier-free guidance in the same call: guided samples add a null-label row (ddpm/guidance.py)
        null = self.model.num_classes
        labels = torch.tensor([job.class_labels[k] if job.class_labels else null for job, k in running.owners], device=self.device)
        # on the host: guided_eps finds the guided rows (none: one plain call) without a device sync
        scales = torch.tensor([job.guidance_scale for job, _ in running.owners], dtype=torch.float32)
        return t, coefs, guided_eps(self.model.eps_model, running.x, t, labels, scales, null)

    def _step(self, running: _Running, eps: torch.Tensor, t: torch.Tensor, coefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ONE fused step over the running batch, every sampler, clip setting and chain at once; returns
        x_prev and (while any row runs a multistep sampler) every row's x0_hat."""
        self._fault("step")
        return self.step_fn(running.x, eps, StepCoefficients.from_stacked(coefs), running.seeds, t + 1, running.x0_prev)

    def _advance(self, running: _Running, new_x: torch.Tensor, x0: torch.Tensor | None, seconds: float) -> None:
        """Move every sample one step on, retire those at x_0, and tell the jobs. Rows of jobs that
        finished meanwhile (failed, cancelled, aborted from another thread) leave the batch."""
        positions = running.positions - 1
        finished = (positions < 0).tolist()
        touched: dict[int, Job] = {}
        keep = []
        for row, (job, k) in enumerate(running.owners):
            if job.done:
                continue
            job.steps_done += 1
            touched[job.id] = job
            if finished[row]:
                assert job.images is not None
                job.images[k] = new_x[row].float().cpu()
                job.images_done += 1
            else:
                keep.append(row)
        self._running = self._select(_Running(new_x, positions, running.seeds, running.owners, x0), keep)
        self.iterations += 1  # counters and gauges are current before anyone is told
        self._observe("on_iteration", len(running.owners), seconds)
        self._observe("on_load", self._queued_images, self.running)
        for job in touched.values():
            if job.images_done == job.n:
                self._finish(job)
            elif job.on_progress is not None:
                self._callback(job, job.on_progress)

    def _take_waiting(self) -> list[tuple[Job, int]]:
        """Pick the images that join the running batch this iteration (bookkeeping only)."""
        free = self.max_batch - self.running
        if self.scheduling == "request" and self._running is not None:
            return []  # request-level batching: the batch runs its whole chain before anything joins
        new: list[tuple[Job, int]] = []
        while free > 0 and self._waiting:
            client, jobs = next(iter(self._waiting.items()))
            if self.scheduling == "continuous":
                job = jobs.popleft()  # round robin: one image per client per turn, and per job within a client
                new.append((job, job._pending.popleft()))
                free -= 1
                if job._pending:
                    jobs.append(job)
            else:
                job = jobs[0]  # first come, first served, whole jobs while they fit
                take = min(free, len(job._pending))
                new.extend((job, job._pending.popleft()) for _ in range(take))
                free -= take
                if not job._pending:
                    jobs.popleft()
            if not jobs:
                del self._waiting[client]
            else:
                self._waiting.move_to_end(client)
        self._queued_images -= len(new)
        return new

    def _start(self, new: list[tuple[Job, int]]) -> None:
        """Draw x_T for the new images and add them to the running batch."""
        seeds = seeds_to_tensor([image_seeds(job.seed, 1, first=k)[0] for job, k in new], self.device)
        x_T = sample_noise(seeds, 0, self.shape)  # (N, C, H, W): x_T of each image from its own key
        positions = torch.tensor([job.steps - 1 for job, _ in new], dtype=torch.long, device=self.device)
        now = time.monotonic()
        with self._lock:
            live = [row for row, (job, _) in enumerate(new) if not job.done]
            if not live:
                return
            part = self._select(_Running(x_T, positions, seeds, new), live)
            assert part is not None
            r = self._running
            if r is None:
                self._running = part
            else:
                state = None if r.x0_prev is None else torch.cat([r.x0_prev, torch.zeros_like(part.x, dtype=torch.float32)])
                x, at = torch.cat([r.x, part.x]), torch.cat([r.positions, part.positions])
                self._running = self._with_state(_Running(x, at, torch.cat([r.seeds, part.seeds]), r.owners + part.owners, state))
            for job, _ in part.owners:
                if job.first_admitted is None:
                    job.first_admitted = now
                    self._observe("on_admitted", job)

    # --- removing work -------------------------------------------------------------------------------
    @staticmethod
    def _with_state(running: _Running) -> _Running:
        """x0_prev exactly while some row runs a multistep sampler (zeros for a row's first step)."""
        multistep = any(job.chain.multistep for job, _ in running.owners)
        if multistep and running.x0_prev is None:
            running.x0_prev = torch.zeros_like(running.x, dtype=torch.float32)
        elif not multistep:
            running.x0_prev = None
        return running

    @classmethod
    def _select(cls, running: _Running, rows: list[int]) -> _Running | None:
        if not rows:
            return None
        if len(rows) == len(running.owners):
            return cls._with_state(running)
        idx = torch.tensor(rows, dtype=torch.long, device=running.x.device)
        x0_prev = None if running.x0_prev is None else running.x0_prev[idx]
        return cls._with_state(
            _Running(running.x[idx], running.positions[idx], running.seeds[idx], [running.owners[r] for r in rows], x0_prev)
        )

    def _drop_dead_jobs(self) -> None:
        now = time.monotonic()
        for job in self._jobs_in_flight():
            if job._cancelled:
                self._fail_jobs([job], Cancelled("the client went away"))
            elif now > job.deadline:
                self._fail_jobs([job], DeadlineExceeded(f"deadline of {job.timeout_s:g} s exceeded"))

    def _jobs_in_flight(self) -> list[Job]:
        jobs = {job.id: job for queue in self._waiting.values() for job in queue}
        if self._running is not None:
            jobs.update({job.id: job for job, _ in self._running.owners})
        return list(jobs.values())

    def _fail_jobs(self, jobs: list[Job], error: EngineError) -> None:
        jobs = [job for job in jobs if not job.done]
        ids = {job.id for job in jobs}
        for job in jobs:
            self._queued_images -= len(job._pending)
            job._pending.clear()
            job.error = error
        for client in list(self._waiting):
            queue = collections.deque(j for j in self._waiting[client] if j.id not in ids)
            if queue:
                self._waiting[client] = queue
            else:
                del self._waiting[client]
        if self._running is not None:
            keep = [row for row, (job, _) in enumerate(self._running.owners) if job.id not in ids]
            self._running = self._select(self._running, keep)
        self._observe("on_load", self._queued_images, self.running)
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
        self._observe("on_job_done", job)
        if job.on_done is not None:
            self._callback(job, job.on_done)

    @staticmethod
    def _callback(job: Job, fn: Callable[[Job], None]) -> None:
        try:
            fn(job)
        except Exception as exc:  # e.g. the event loop that waits for it has closed
            log.error("job callback failed", exc_info=exc, extra={"fields": {"stage": "callback", "request_id": job.request_id}})
