"""Step-level (continuous) batching of DDPM chains: the engine that owns the model.

One running set of samples, each at its own position in its own (possibly respaced) chain. Every
iteration reads as four calls with plain data between them (``Engine._iterate``): **admit** waiting
images up to ``max_batch`` (the request queue's policy decides which: ``request_queue.py``), run ONE
**eps**_theta call over the whole batch with per-sample t, apply ONE fused **step** with per-sample
coefficients and Philox seeds, and **advance**: move every sample on, retire those that reached x_0.
A job (one request) is answered when its last image is done.

Faults: an exception in any stage fails exactly the jobs that stage touched, is logged with their
request ids, and the engine goes on; it then reports itself unhealthy until an iteration succeeds,
and when idle runs a one-sample self-test with backoff (``health.py``). A failing observer (metrics
hook) or job callback is logged and isolated. If the engine thread ends anyway, every waiting job is
answered (``EngineStopped``) and ``on_dead`` tells the owner, which exits so the orchestrator restarts it.

Image k of a job with seed s always uses Philox key ``image_seed(s, k)`` for x_T and every z, so its
pixels do not depend on which other samples shared its iterations (up to float rounding in the
U-Net's batched kernels).

The engine runs in one thread and knows nothing of HTTP; callbacks tell its caller what happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from ddpm.chain import ChainSpec, StepCoefficients, StepFn, default_step_fn
from ddpm.guidance import guided_eps
from ddpm.inference_compile import serving_thread
from ddpm.loaded_model import LoadedModel
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from service.engine.chain_tables_cache import ChainTablesCache
from service.engine.errors import (
    Cancelled,
    DeadlineExceeded,
    Draining,
    EngineError,
    EngineFault,
    EngineStopped,
    ModelFailure,
    QueueFull,
)
from service.engine.health import Health
from service.engine.job import Job
from service.engine.observer import EngineObserver
from service.engine.request_queue import SchedulingName, create_request_queue
from service.engine.running_batch import RunningBatch, StepInputs

log = logging.getLogger("ddpm.engine")


class _StageFailed(Exception):
    """A stage raised; its jobs have been failed and the fault logged (ends this iteration)."""


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int = 64,
        max_queue: int = 1024,
        step_fn: StepFn | None = None,
        observer: EngineObserver | None = None,
        scheduling: SchedulingName = "continuous",
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
        self.chain_tables = ChainTablesCache(model.schedule, model.variance_type, self.device)
        self.health = Health(self_test_backoff_s)
        self._queue = create_request_queue(scheduling)
        self._live: set[int] = set()  # ids of jobs submitted and not finished
        self._running: RunningBatch | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.dead: str | None = None  # why the engine thread ended, when it ended on a fault
        self.iterations = 0
        self._last_progress = time.monotonic()  # the end of the last iteration attempt (or the last idle moment)

    # --- public, any thread -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        self.chain_tables(job.chain)  # a chain the schedule cannot make fails here, not in the engine
        job.check_inputs(self.shape)
        with self._lock:
            if self.dead is not None or self._stop:
                raise EngineStopped("the engine has stopped")
            if self.draining:
                raise Draining("the server is draining and accepts no new work")
            if self._queue.images + job.n > self.max_queue:
                raise QueueFull(f"queue full: {self._queue.images} images waiting, capacity {self.max_queue}")
            self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        job.images = torch.empty((job.n, *self.shape), dtype=torch.float32)  # no fill: torch work stays on the engine thread
        self._queue.add(job)
        self._live.add(job.id)
        self._observe("on_load", self._queue.images, self.running)
        self._lock.notify_all()

    def images_ahead(self, job: Job) -> int | None:
        """Images of earlier requests still waiting for a slot (the job's queue position, counted in
        images), or None once the job's first image has joined the running batch."""
        with self._lock:
            if job.first_admitted is not None or job.done:
                return None
            return self._queue.images_ahead(job)

    @property
    def running(self) -> int:
        running = self._running
        return 0 if running is None else len(running)

    @property
    def queue_depth(self) -> int:
        return self._queue.images

    @property
    def idle(self) -> bool:
        return not self._live

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    @property
    def self_tests(self) -> int:
        return self.health.self_tests

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing an iteration (0 when idle or moving):
        a device call that never returns shows here, since it cannot raise."""
        if not self._has_work():
            return 0.0
        return max(0.0, time.monotonic() - self._last_progress)

    # --- lifecycle: start, stop, drain ---------------------------------------------------------------
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

    def abort(self, error: EngineError, lock_timeout: float = -1) -> int:
        """Answer every job in flight with ``error`` now (the drain deadline, a stall); returns how many.
        Safe while an iteration runs: the engine drops rows of finished jobs when it advances. With
        ``lock_timeout`` (a stalled engine thread may hold the lock) nothing is done if the lock is not had by then."""
        if not self._lock.acquire(timeout=lock_timeout):
            log.error("abort: the engine lock was not free within %.1f s; in-flight jobs not answered", lock_timeout)
            return 0
        try:
            jobs = self._jobs_in_flight()
            self._fail_jobs(jobs, error)
        finally:
            self._lock.release()
        return len(jobs)

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.idle and time.monotonic() < end:
            time.sleep(0.05)
        return self.idle

    def warmup(self, steps: int, sizes: Iterable[int] | None = None) -> None:
        """Run short chains through the engine's own iteration code (before start) at batch 1, 2 and
        max_batch (or ``sizes``), one for every variant of the step a request can ask for: plain, clipped
        and not; multistep (x0_prev); restart's jump back up (multistep with jump terms, the default
        chain); inpainting (a mask and RePaint's jumps, no multistep state); guided, for a conditional
        model. A compiled hot path builds its graphs here (the compile thread: background_compile.py)."""
        if steps <= 0:
            return
        observer, self.observer = self.observer, EngineObserver()  # warm-up is not served work: no metrics
        t = self.model.schedule.num_timesteps
        steps = min(steps, t)
        half = torch.ones(self.shape, dtype=torch.float32)
        half[..., : self.shape[-1] // 2] = 0.0  # the left half repainted
        chains = [ChainSpec(steps, "ddpm", clip=True), ChainSpec(steps, "ddpm", clip=False), ChainSpec(steps, "dpmsolver++", clip=True),
                  ChainSpec(min(max(steps, 4), t), "restart", clip=True),  # 4 calls: the shortest with a jump
                  ChainSpec(min(max(steps, 2), t), "ddim", repaint=True, jump_length=1, jump_n_sample=2)]  # fmt: skip
        try:
            for n in sorted(set(sizes) if sizes is not None else {1, min(2, self.max_batch), self.max_batch}):
                for chain in chains:
                    guided = self.model.conditional and chain.sampler == "dpmsolver++"  # and a guided batch (2 rows per sample)
                    job = Job(seed=0, n=n, chain=chain, timeout_s=3600, class_labels=(0,) * n if guided else None,
                              guidance_scale=1.0 if guided else 0.0, init_image=-half if chain.repaint else None,
                              mask=half if chain.repaint else None)  # fmt: skip
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
        with serving_thread():  # a compiled function runs the graphs that exist here and never compiles
            self._serve()

    def _serve(self) -> None:
        error: EngineError = Cancelled("the engine stopped")
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._has_work() and not self.health.self_test_due():
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
            with self._lock:
                self._fail_jobs(self._jobs_in_flight(), error)
            if self.dead is not None and self.on_dead is not None:
                self.on_dead(self.dead)

    def _has_work(self) -> bool:
        return bool(self._queue) or self._running is not None

    @torch.inference_mode()  # every tensor of the running batch is an inference tensor (compiled graphs guard on it)
    def _iterate(self) -> None:
        """admit -> eps -> step -> advance. A stage that raises fails the jobs it touched and ends the iteration."""
        try:
            batch = self._admit()
            if batch is None:
                return
            start = time.perf_counter()
            inputs, eps = self._stage("unet", batch, self._eps, batch)
            new_x, x0 = self._stage("step", batch, self._step, batch, inputs, eps)
            self._stage("advance", batch, self._advance, batch, new_x, x0, time.perf_counter() - start)
        except _StageFailed:
            return
        self.health.healed("an iteration succeeded")

    def _stage(self, stage: str, batch: RunningBatch, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except Exception as exc:  # a broken model fails the jobs in the batch, not the engine
            self._on_fault(stage, exc, batch.jobs())
            raise _StageFailed from exc

    def _admit(self) -> RunningBatch | None:
        """Drop dead jobs, add the images the queue admits (their x_T drawn), and return the running batch."""
        with self._lock:
            self._drop_dead_jobs()
            free = self.max_batch - self.running
            new = self._queue.take(free) if self._running is None or self._queue.admits_while_running else []
        if new:
            try:
                self._fault("admit")
                self._start(new)
            except Exception as exc:
                self._on_fault("admit", exc, [job for job, _ in new])
                raise _StageFailed from exc
        with self._lock:
            return self._running

    def _start(self, new: list[tuple[Job, int]]) -> None:
        """Draw x_T for the new images (or, for SDEdit, noise the input to the chain's first level) and
        add them to the running batch."""
        seeds = seeds_to_tensor([image_seeds(job.seed, 1, first=k)[0] for job, k in new], self.device)
        x_T = sample_noise(seeds, 0, self.shape)  # (N, C, H, W): x_T of each image from its own key
        for row, (job, _) in enumerate(new):
            if job.chain.strength < 1.0 and job.init_image is not None:  # SDEdit: Eq. 4 at t0, with x_T's z
                tables = self.chain_tables(job.chain)
                x_T[row] = tables.start_x * job.init_image.to(self.device) + tables.start_z * x_T[row]
        positions = torch.tensor([job.calls - 1 for job, _ in new], dtype=torch.long, device=self.device)
        now = time.monotonic()
        with self._lock:
            part = RunningBatch(x_T, positions, seeds, new).select([row for row, (job, _) in enumerate(new) if not job.done])
            if part is None:
                return
            self._running = part if self._running is None else self._running.extend(part)
            for job, _ in part.owners:
                if job.first_admitted is None:
                    job.first_admitted = now
                    self._observe("on_admitted", job)

    def _eps(self, batch: RunningBatch) -> tuple[StepInputs, torch.Tensor]:
        """Per-sample t, noise counter and step coefficients from each sample's own chain tables, and
        ONE eps_theta call over the running batch."""
        inputs = batch.step_inputs(self.chain_tables)
        t = inputs.t
        self._fault("unet")
        if not self.model.conditional:
            return inputs, self.model.eps_model(batch.x, t)
        # classifier-free guidance in the same call: guided samples add a null-label row (ddpm/guidance.py)
        null = self.model.num_classes
        labels = torch.tensor([job.class_labels[k] if job.class_labels else null for job, k in batch.owners], device=self.device)
        # on the host: guided_eps finds the guided rows (none: one plain call) without a device sync
        scales = torch.tensor([job.guidance_scale for job, _ in batch.owners], dtype=torch.float32)
        return inputs, guided_eps(self.model.eps_model, batch.x, t, labels, scales, null)

    def _step(self, batch: RunningBatch, inputs: StepInputs, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ONE fused step over the running batch, every sampler, clip setting, chain and edit at once;
        returns x_prev and (while any row runs a multistep sampler) every row's x0_hat."""
        self._fault("step")
        coefs = StepCoefficients.from_stacked(inputs.coefs)
        if inputs.edit is None:  # the signature every step function has
            return self.step_fn(batch.x, eps, coefs, batch.seeds, inputs.counters, batch.x0_prev)
        return self.step_fn(batch.x, eps, coefs, batch.seeds, inputs.counters, batch.x0_prev, inputs.edit)

    def _advance(self, batch: RunningBatch, new_x: torch.Tensor, x0: torch.Tensor | None, seconds: float) -> None:
        """Move every sample one step on, retire those at x_0, and tell the jobs. Rows of jobs that
        finished meanwhile (failed, cancelled, aborted from another thread) leave the batch."""
        with self._lock:
            self._fault("advance")
            moved = batch.stepped(new_x, x0)
            finished = (moved.positions < 0).tolist()
            touched: dict[int, Job] = {}
            keep = []
            for row, (job, k) in enumerate(batch.owners):
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
            self._running = moved.select(keep)
            self.iterations += 1  # counters and gauges are current before anyone is told
            self._observe("on_iteration", len(batch), seconds)
            self._observe("on_load", self._queue.images, self.running)
            for job in touched.values():
                if job.images_done == job.n:
                    self._finish(job)
                elif job.on_progress is not None:
                    self._callback(job, job.on_progress)

    # --- health, beside the loop -------------------------------------------------------------------
    def _fault(self, stage: str) -> None:
        if self.faults is not None:
            self.faults(stage)

    @torch.inference_mode()
    def _self_test(self) -> None:
        """One sample's last step through the U-Net and the fused step, off the books (no job, no
        metrics): readiness heals when the model works again, without waiting for traffic."""
        self.health.self_tests += 1
        probe = Job(seed=0, n=1, chain=ChainSpec(1), timeout_s=60)
        seeds = seeds_to_tensor([image_seeds(0, 1)[0]], self.device)
        batch = RunningBatch(sample_noise(seeds, 0, self.shape), torch.zeros(1, dtype=torch.long, device=self.device), seeds, [(probe, 0)])
        try:
            inputs, eps = self._eps(batch)
            out, _ = self._step(batch, inputs, eps)
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError("self-test produced non-finite values")
        except Exception as exc:
            self.health.self_test_failed(exc)
            return
        self.health.healed("self-test passed")

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
        self.health.failed()
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

    # --- removing work (the lock held) -------------------------------------------------------------------
    def _drop_dead_jobs(self) -> None:
        now = time.monotonic()
        for job in self._jobs_in_flight():
            if job.cancelled:
                self._fail_jobs([job], Cancelled("the client went away"))
            elif now > job.deadline:
                self._fail_jobs([job], DeadlineExceeded(f"deadline of {job.timeout_s:g} s exceeded"))

    def _jobs_in_flight(self) -> list[Job]:
        jobs = {job.id: job for job in self._queue.jobs()}
        if self._running is not None:
            jobs.update({job.id: job for job, _ in self._running.owners})
        return list(jobs.values())

    def _fail_jobs(self, jobs: list[Job], error: EngineError) -> None:
        jobs = [job for job in jobs if not job.done]
        ids = {job.id for job in jobs}
        for job in jobs:
            job.error = error
        self._queue.remove(jobs)
        if self._running is not None:
            self._running = self._running.select([row for row, (job, _) in enumerate(self._running.owners) if job.id not in ids])
        self._observe("on_load", self._queue.images, self.running)
        for job in jobs:
            self._finish(job)

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
