"""Step-level (continuous) batching of DDPM chains: the engine that owns the model.

One running set of samples, each at its own position in its own (possibly respaced) chain. Every
iteration reads as four calls with plain data between them (``Engine._iterate``): **admit** waiting
images up to ``max_batch`` (the request queue's policy decides which: ``request_queue.py``), run ONE
**eps**_theta call over the whole batch with per-sample t, apply ONE fused **step** with per-sample
coefficients and Philox seeds, and **advance**: move every sample on, retire those that reached x_0.
A job (one request) is answered when its last image is done. The eps and step stages, and how rows
join, are ``ddpm.denoising_iteration``'s: the offline sampler runs the same code (``ddpm.offline_sampler``);
this module adds what serving needs (the queue, the scheduler, fault isolation, the thread, readouts).

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

import collections
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ddpm.chain import ChainSpec, StepFn, default_step_fn
from ddpm.chain_table_store import ChainTableStore
from ddpm.chain_tables_cache import ChainTablesCache
from ddpm.denoising_iteration import DenoisingIteration
from ddpm.finite_images import finite_rows
from ddpm.image_request import EditInput, ImageRequest
from ddpm.inference_compile import serving_thread
from ddpm.loaded_model import LoadedModel
from ddpm.running_batch import StepInputs, host_to_device
from ddpm.samplers import inpainting_samplers, step_variants
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from service.engine import previews
from service.engine.answer_time import AnswerTime
from service.engine.call_size import CallSize
from service.engine.errors import (
    Cancelled,
    DeadlineExceeded,
    DeadlineUnmeetable,
    Draining,
    EngineError,
    EngineFault,
    EngineStopped,
    ModelFailure,
    NonFiniteImages,
    QueueFull,
)
from service.engine.health import Health
from service.engine.heap_trim import release_free_heap
from service.engine.iteration_cost import IterationCost
from service.engine.job import Job
from service.engine.observer import EngineObserver
from service.engine.request_queue import SchedulingName, create_request_queue
from service.engine.served_batch import ServedBatch
from service.engine.step_scheduler import MAX_SLOWDOWN, STARVE_AFTER, choose, iteration_limit, slowdown_limit

log = logging.getLogger("ddpm.engine")
HEAP_TRIM_AFTER_S = 1.0  # idle this long after work: the heap's free pages go back to the OS (not between requests under load)
DEADLINE_MEMORY_S = 60.0  # how long the tightest deadline seen keeps shortening iterations (step_scheduler.iteration_limit)


def _prepare(job: Job) -> None:
    """What the engine needs of a job per image, computed once: the Philox key of each image (int64 bits)."""
    if job.keys is None:
        job.keys = [key - (1 << 64) if key >= (1 << 63) else key for key in image_seeds(job.seed, job.n, job.request.first)]


class _StageFailed(Exception):
    """A stage raised; its jobs have been failed and the fault logged (ends this iteration)."""


@dataclass
class _Readout:
    """Finished images on their way to the host: (f, C, H, W) float32, their owners, and on CUDA the
    event after which the copy is complete."""

    images: torch.Tensor
    owners: list[tuple[Job, int]]
    event: torch.cuda.Event | None


def _copied(event: torch.cuda.Event | None, wait: bool) -> bool:
    """Whether a readout's copy to the host is complete (none on CPU); ``wait``: wait for it."""
    if event is None:
        return True
    if not wait and not event.query():
        return False
    event.synchronize()
    return True


@dataclass
class _PreviewReadout:
    """Partial images on their way to the host, as ``_Readout``: (job, image k, preview index) each."""

    images: torch.Tensor
    owners: list[tuple[Job, int, int]]
    event: torch.cuda.Event | None


class Engine:
    _cold: set[int] | None = None  # while warming up: the U-Net row counts whose first call has run
    _worked_at: float | None = None  # the end of the last work since the heap was last trimmed (None: trimmed since)
    heap_trim_after_s = HEAP_TRIM_AFTER_S

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
        max_resident: int | None = None,
        starve_after: int = STARVE_AFTER,
        max_slowdown: float = MAX_SLOWDOWN,
        tune_call_size: bool = False,
        deadline_margin_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        # rows held in the running batch: more than one U-Net call's, so that a waiting request gets rows and
        # shares iterations (step_scheduler.py) instead of waiting for a whole chain to end
        self.max_resident = max(max_batch, max_resident or max_batch)
        self.starve_after = starve_after
        self.max_slowdown = max_slowdown  # a job without a deadline: at most this x its time alone, while rows allow (0: off)
        self.clock = clock  # the scheduler's now (a test's fake clock); the request deadlines stay monotonic
        self.cost = IterationCost()
        self.call_size = CallSize(max_batch, tune=tune_call_size)  # rows per U-Net call while more are resident
        self.answer_time = AnswerTime(deadline_margin_s)  # of a deadline, what the answer takes after the images
        self._iteration_ends = 0.0  # when the iteration in flight should end (monotonic; admission control's wait)
        self._tight_deadline: tuple[float, float] | None = None  # (the tightest accepted deadline_s lately, until when)
        self.max_queue, self.scheduling, self.idle_poll_s = max_queue, scheduling, idle_poll_s
        self.step_fn = step_fn or default_step_fn()
        self.observer = observer or EngineObserver()
        self.faults = faults  # testing aid (service.fault_injection): called with each stage's name
        self.on_dead = on_dead
        self.device = model.device
        self.shape = model.image_shape
        self.chain_tables = ChainTablesCache(model.schedule, model.variance_type, self.device)
        self.iteration = DenoisingIteration(model, self.step_fn)
        self.iteration.faults = self._fault
        self.health = Health(self_test_backoff_s)
        self._queue = create_request_queue(scheduling)
        self._live: set[int] = set()  # ids of jobs submitted and not finished
        self._batch = self._new_batch(self.max_resident)
        self._deadlines: list[tuple[float, int, Job]] = []  # a heap: the next job to time out first
        self._cancelled: collections.deque[Job] = collections.deque()  # cancelled from other threads (append/popleft: thread-safe)
        self._promoted: list[Job] = []  # jobs a more urgent request shares, whose resident rows take its priority (lock held)
        self._readouts: list[_Readout] = []  # finished images on their way to the host (CUDA)
        self._preview_readouts: list[_PreviewReadout] = []  # partial images on their way to the host
        self._streaming: dict[int, Job] = {}  # running jobs that report progress every iteration (streams)
        self._previewing: dict[int, Job] = {}  # running jobs that want partial images (service/engine/previews.py)
        self._new_streams: collections.deque[Job] = collections.deque()  # jobs a stream began to watch while they ran
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop, self.draining, self.iterations = False, False, 0
        self.dead: str | None = None  # why the engine thread ended, when it ended on a fault
        self._last_progress = time.monotonic()  # the end of the last iteration attempt (or the last idle moment)

    # --- public, any thread -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        self.chain_tables(job.chain)  # a chain the schedule cannot make fails here, not in the engine
        job.request.check_inputs(self.shape)
        _prepare(job)  # per-image work on the caller's thread, not the engine's
        with self._lock:
            if self.dead is not None or self._stop:
                raise EngineStopped("the engine has stopped")
            if self.draining and not job.routed_before_drain:
                raise Draining("the server is draining and accepts no new work")
            if self._queue.images + job.n > self.max_queue:
                raise QueueFull(f"queue full: {self._queue.images} images waiting, capacity {self.max_queue}")
            self._admission_control(job)
            self._bound_slowdown(job)
            self._enqueue(job)
        return job

    def promote(self, job: Job, priority: int) -> bool:
        """``job`` served at ``priority`` from now where that is more urgent than its own: a more urgent request shares it
        (priority inheritance; it would otherwise compute the same images again beside it). Its waiting images move to
        that level at once, its resident rows at the next admission (the engine thread owns them). False where the job
        is done or cancelled: the request then needs a job of its own."""
        with self._lock:
            if job.done or job.cancelled or job.id not in self._live:
                return False
            if priority < job.priority:
                self._queue.move(job, priority)
                self._promoted.append(job)
            return True

    def _new_batch(self, capacity: int) -> ServedBatch:
        store = ChainTableStore(self.chain_tables, self.device)
        return ServedBatch(capacity, self.shape, store, self.device, self.model.conditional, self.model.num_classes)

    def _enqueue(self, job: Job) -> None:
        _prepare(job)
        job.images = torch.empty((job.n, *self.shape), dtype=torch.float32)  # no fill: torch work stays on the engine thread
        job.live_steps = self._live_steps
        job.on_cancel = self._cancelled.append  # the engine takes them at its next iteration
        if job.cancelled:  # cancelled before it got here (the hook is set first: no cancel falls between)
            self._cancelled.append(job)
        self._queue.add(job)
        self._live.add(job.id)
        heapq.heappush(self._deadlines, (job.deadline, job.id, job))
        self._observe("on_load", self._queue.images, self.running)
        self._lock.notify_all()

    def predicted_seconds(self, job: Job) -> float | None:
        """Submission to images done for ``job`` if it were submitted now (None before the first measured iteration):
        what is left of the iteration in flight, then the work at its priority or a better one, resident and
        waiting, at the measured iteration cost. Rows of a worse priority do not count: they sit out for it
        (step_scheduler.py); nor, for a job with a deadline, resident rows without one. Counted in U-Net rows
        (a guided image is two), as the cost model is. When they all fit in one call, each of its iterations
        costs what its own rows and those still running beside it cost (a row ahead leaves when its chain ends)."""
        b = self.call_size.best
        full = self.cost.seconds(b)
        if full is None:
            return None
        batch, p = self._batch, job.priority
        ahead = batch.priority_host[: batch.n] <= p
        if job.deadline_s is not None:  # rows with a deadline go before those without (step_scheduler.py)
            ahead &= np.isfinite(batch.due_host[: batch.n])
        left, weight = batch.pos_host[: batch.n][ahead] + 1, batch.unet_rows_of(ahead)  # iterations left, U-Net rows
        queued_rows, queued_work = self._queue.calls_at_or_above(p, dated_only=job.deadline_s is not None)
        if queued_rows:  # waiting images: their chains' mean length, from now
            weight, left = np.append(weight, queued_rows), np.append(left, -(-queued_work // queued_rows))
        own = job.n * job.request.rows_per_image
        wait = max(0.0, self._iteration_ends - time.monotonic())  # the iteration in flight when it arrives
        if own + int(weight.sum()) <= b:  # it runs every iteration beside everything at its priority or better (rows of
            chain = self.cost.chain_seconds(own, job.calls, left, weight)  # a worse one join only as far as its deadline allows)
            return wait + (job.calls * full if chain is None else chain)
        return wait + max(job.calls * full, (int((left * weight).sum()) + job.n * job.row_calls) / b * full)

    def _bound_slowdown(self, job: Job) -> None:
        """A job without a deadline gets a soft one: ``max_slowdown`` x what it would take alone (its calls at
        its own rows' measured cost). Never refused for it; while it can still be met, iterations stay short
        enough for it (step_scheduler.slowdown_limit): a 10-call request beside a 64-row chain on a CPU."""
        if job.deadline_s is not None or self.max_slowdown <= 0:
            return
        alone = self._alone(job)
        if alone is not None:
            job.soft_due = job.created + self.max_slowdown * alone[0]
            job.soft_step_s = alone[1]

    def _alone(self, job: Job) -> tuple[float, float] | None:
        """The seconds ``job`` takes with nothing beside it, and one iteration of its rows (a call size's worth at a
        time): its calls at its own rows' measured cost; None before that cost is measured."""
        unet_rows = job.n * job.request.rows_per_image
        rows = min(unet_rows, self.call_size.best)
        per = self.cost.seconds(rows)
        return None if per is None else (job.calls * per * -(-unet_rows // rows), per)

    def _admission_control(self, job: Job) -> None:
        """Refuse at once a job whose deadline cannot be met given the work ahead of it (the lock held): 503 +
        Retry-After, so that a load balancer sends it to another replica instead of it timing out here. Any job that
        alone would take longer than its timeout (DDPM_REQUEST_TIMEOUT_S) too: it would end 504 after holding rows
        for all of it, and every retry again (the openai client retries a 504 twice)."""
        alone = self._alone(job)
        if alone is not None and alone[0] > job.timeout_s:
            self._observe("on_refused", "timeout")
            raise DeadlineUnmeetable(
                f"even alone on this replica it would take ~{alone[0]:.0f} s ({job.calls} U-Net calls), longer than the request "
                f"timeout of {job.timeout_s:g} s (DDPM_REQUEST_TIMEOUT_S); ask for fewer images or calls, or another replica",
                retry_after_s=1.0,
            )
        if job.deadline_s is None:
            return
        now = time.monotonic()
        job.reserve_s = self.answer_time.kept_of(job.deadline_s)
        self._refuse_if_late(job, now)
        tight = self._tight_deadline  # accepted: its deadline shapes the iterations (a refused one, which anyone may
        if tight is None or tight[1] < now or job.deadline_s <= tight[0]:  # send, must not shrink every call to 1 row)
            self._tight_deadline = (job.deadline_s, now + DEADLINE_MEMORY_S)

    def _refuse_if_late(self, job: Job, now: float) -> None:
        """Raise ``DeadlineUnmeetable`` when ``job`` would answer past its deadline, or push an accepted one past its."""
        predicted = self.predicted_seconds(job)
        if predicted is None:
            return
        predicted += max(0.0, now - job.created)  # since arrival
        answer = min(job.reserve_s, self.answer_time.expected_s)  # a prediction: the scheduler plans with margins
        if predicted <= job.deadline_s < predicted + answer and self.answer_time.stale(now):
            self.answer_time.forget()  # only an old answer estimate refuses it: admit it, measure afresh (answer_time.py)
            job.reserve_s, answer = self.answer_time.kept_of(job.deadline_s), 0.0
        predicted += answer
        if predicted > job.deadline_s:
            wait = max(1.0, predicted - job.deadline_s)
            self._observe("on_refused", "deadline")
            alone = self._alone(job)
            if alone is not None and alone[0] + answer > job.deadline_s:  # no wait here helps: say so; Retry-After 1 s (another
                raise DeadlineUnmeetable(  # replica, or a cost model that changed: a client honouring a longer one only waits longer)
                    f"even alone on this replica it would take ~{alone[0] + answer:.2f} s ({job.calls} U-Net calls), past its "
                    f"deadline of {job.deadline_s:g} s; send a later deadline, or to another replica", retry_after_s=1.0)  # fmt: skip
            raise DeadlineUnmeetable(
                f"the answer would take ~{predicted:.2f} s with the work ahead of it at priority {job.priority}, past its "
                f"deadline of {job.deadline_s:g} s; retry in ~{wait:.0f} s or elsewhere",
                retry_after_s=wait,
            )
        pushed = self._pushes_past_due(job, now)
        if pushed is not None:
            self._observe("on_refused", "accepted_deadlines")
            raise DeadlineUnmeetable(
                f"beside the requests with deadlines already accepted it would make one of them late; retry in ~{pushed:.0f} s "
                "or elsewhere",
                retry_after_s=pushed,
            )

    def _pushes_past_due(self, job: Job, now: float) -> float | None:
        """Seconds until the work with deadlines now held is done, when ``job``'s rows beside it would push a
        request that now makes its deadline past it by more than one iteration (issue 37's bound); else None.
        Every row with a deadline runs every iteration (the scheduler never leaves one out for another), so a
        newcomer slows them all, resident and waiting alike; checked while they and it fit in one call, each
        iteration at the rows still running then (``IterationCost.chain_times``). A request's limit: its planned
        ``due`` plus the reserve's margins over the expected answer time (what admission itself predicts with).
        Measured (scheduling_sim, guided 2x): without the iteration's tolerance 39 more refusals to avoid ~11 late
        answers; with it, fewer misses than no check (BENCHMARKS, stop 50)."""
        batch = self._batch
        dated = np.flatnonzero(np.isfinite(batch.due_host[: batch.n]))
        weight, left, due = batch.unet_rows_of(dated), batch.pos_host[dated] + 1, batch.due_host[dated]
        waiting = [other for other in self._queue.jobs() if other.deadline_s is not None]
        if waiting:  # all their images from the next iteration on
            weight = np.append(weight, [len(other.pending) * other.request.rows_per_image for other in waiting])
            left = np.append(left, [other.calls for other in waiting])
            due = np.append(due, [other.due for other in waiting])
        own = job.n * job.request.rows_per_image
        call = own + int(weight.sum())
        if left.size == 0 or call > self.call_size.best:
            return None
        horizon = int(left.max())
        without = self.cost.chain_times(0, 0, left, weight, horizon)
        beside = self.cost.chain_times(own, job.calls, left, weight, horizon)
        if without is None or beside is None:
            return None
        start = max(now, self._iteration_ends)  # after the iteration in flight
        iteration = self.cost.seconds(call) or 0.0  # the bound: late by at most one iteration
        limit = due + max(0.0, self.answer_time.reserve_s - self.answer_time.expected_s) + iteration
        pushed = (start + without[left - 1] <= limit) & (start + beside[left - 1] > limit)
        return max(1.0, float(without[-1])) if pushed.any() else None

    def answered(self, job: Job, at: float | None = None) -> None:
        """``job``'s answer is encoded (the HTTP layer says so, at monotonic ``at``, default now): for a job
        with a deadline, the time since its images were done is what later deadlines keep (answer_time.py)."""
        if job.deadline_s is not None and job.finished is not None and job.error is None:
            at = time.monotonic() if at is None else at
            self.answer_time.observe(at - job.finished, at)

    def backlog_seconds(self) -> float:
        """Seconds the work held now (resident rows' remaining steps and waiting images' calls) takes at the
        call size (call_size.py): the autoscaler's metric (``ddpm_backlog_seconds``); 0 before the first measured iteration."""
        b = self.call_size.best
        full = self.cost.seconds(b)
        if full is None:
            return 0.0
        with self._lock:
            batch = self._batch
            left = batch.pos_host[: batch.n] + 1
            work = int((left * batch.unet_rows_of(slice(None))).sum()) + self._queue.calls_at_or_above(2**62)[1]
        return work / b * full

    def images_ahead(self, job: Job) -> int | None:
        """Images of earlier requests still waiting for a slot (the job's queue position, counted in
        images), or None once the job's first image has joined the running batch."""
        with self._lock:
            if job.first_admitted is not None or job.done:
                return None
            return self._queue.images_ahead(job)

    def _live_steps(self, job: Job) -> int:
        return self._batch.steps_of(job.id)

    @property
    def running(self) -> int:
        return self._batch.n

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

    def warmup(self, steps: int, sizes: Iterable[int] | None = None, shape_sizes: Iterable[int] = ()) -> None:
        """Run short chains through the engine's own iteration code (before start) at batch 1, 2 and
        max_batch (or ``sizes``), one for every variant of the step a request can ask for (``_warmup_chains``).
        A compiled hot path builds its graphs here (the compile thread: background_compile.py). At
        ``shape_sizes`` only the U-Net's shapes: the plain chain, and the guided one (twice the rows) for a
        conditional model (an eager CPU path, where nothing compiles per variant: server_state.py). Every
        warm-up call takes its job's full rows (the shape it is there for, whatever the call size says), and a
        size's first call is not measured (it builds the shape's primitives and grows the allocator: up to 3x a
        warm call on a CPU), so the plain chain runs two iterations at least where it runs alone."""
        if steps <= 0:
            return
        t = self.model.schedule.num_timesteps
        chains, guided_chain = self._warmup_chains(min(steps, t))
        every = set(sizes) if sizes is not None else {1, min(2, self.max_batch), self.max_batch}
        plain = replace(chains[0], steps=min(max(chains[0].steps, 2), t))
        shapes = [plain, *([guided_chain] if self.model.conditional and guided_chain is not None else [])]
        half = torch.ones(self.shape, dtype=torch.float32)
        half[..., : self.shape[-1] // 2] = 0.0  # the left half repainted
        observer, self.observer = self.observer, EngineObserver()  # warm-up is not served work: no metrics
        tune, self.call_size.tune, self._cold = self.call_size.tune, False, set()
        try:
            for n in sorted(every | set(shape_sizes)):
                for chain in chains if n in every else shapes:
                    guided = self.model.conditional and chain is guided_chain
                    edit = EditInput("warm-up", -half, half) if chain.repaint else None
                    job = Job(ImageRequest(0, n, chain, (0,) * n if guided else None, 1.0 if guided else 0.0, edit), timeout_s=3600)
                    with self._lock:
                        self._enqueue(job)  # not submit(): warm-up ignores the queue limit
                    while not job.done:
                        self._iterate()
                    if job.error is not None:  # the cause, not the client-facing message: this goes to the log
                        raise RuntimeError(f"warm-up failed: {getattr(job.error, 'cause', job.error)}") from job.error
        finally:
            self.observer, self.call_size.tune, self._cold = observer, tune, None

    def _warmup_chains(self, steps: int) -> tuple[list[ChainSpec], ChainSpec | None]:
        """One chain per variant of the step a request can ask for: plain, clipped and not; one sampler per step
        variant (``ddpm.samplers.step_variants``: multistep state x0_prev, multistep with jump terms: restart, the
        default chain); inpainting (a mask and RePaint's jumps, no multistep state); and the chain a guided batch
        runs (the first multistep one), for a conditional model."""
        t = self.model.schedule.num_timesteps
        chains = [ChainSpec(steps, clip=False)]
        for rule in step_variants():  # a sampler that jumps: at least the calls its plan needs for a jump
            chains.append(ChainSpec(min(max(steps, rule.shortest_with_jumps or 1), t), rule.name, clip=True))
        chains.append(ChainSpec(min(max(steps, 2), t), inpainting_samplers()[-1], repaint=True, jump_length=1, jump_n_sample=2))
        return chains, next((chain for chain in chains if chain.multistep), None)

    # --- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        # a compiled function runs the graphs that exist here and never compiles; every tensor of the running
        # batch is an inference tensor (compiled graphs guard on it), the mode entered once, not per iteration
        with serving_thread(), torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        error: EngineError = Cancelled("the engine stopped")
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._has_work() and not self.health.self_test_due() and not self._heap_trim_due():
                        self._last_progress = time.monotonic()  # idle is not stalled
                        self._lock.wait(self.idle_poll_s)
                    if self._stop:
                        break
                    work = self._has_work()
                self._fault("loop")
                if work:
                    self._iteration()
                    self._worked_at = time.monotonic()
                elif self._heap_trim_due():  # idle for a while after work: what it freed goes back to the OS (heap_trim.py)
                    release_free_heap()
                    self._worked_at = None
                else:
                    self._self_test()
                    self._worked_at = time.monotonic()
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
        return bool(self._queue) or self._batch.n > 0 or bool(self._readouts)

    def _heap_trim_due(self) -> bool:
        return self._worked_at is not None and time.monotonic() - self._worked_at >= self.heap_trim_after_s

    @torch.inference_mode()  # every tensor of the running batch is an inference tensor (compiled graphs guard on it)
    def _iterate(self) -> None:
        self._iteration()

    def _iteration(self) -> None:
        """admit -> eps -> step -> advance. A stage that raises fails the jobs it touched and ends the iteration.
        Called in inference mode (the engine thread enters it once, not per iteration)."""
        try:
            batch = self._admit()
            if batch is None:
                self._deliver(wait=True)  # nothing runs: images still on their way are waited for now
                return
            start = time.perf_counter()
            m = self._stage("admit", batch, self._schedule, batch)
            inputs, eps = self._stage("unet", batch, self._eps, batch, m)
            new_x, x0 = self._stage("step", batch, self._step, batch, m, inputs, eps)
            self._stage("advance", batch, self._advance, batch, new_x, x0, time.perf_counter() - start)
        except _StageFailed:
            return
        self.health.healed("an iteration succeeded")

    def _stage(self, stage: str, batch: ServedBatch, fn: Callable[..., object], *args: object) -> object:
        try:
            return fn(*args)
        except Exception as exc:  # a broken model fails the jobs in the batch, not the engine
            self._on_fault(stage, exc, batch.jobs())
            raise _StageFailed from exc

    def _admit(self) -> ServedBatch | None:
        """Drop dead jobs, add the images the queue admits (their x_T drawn), and return the running batch."""
        with self._lock:
            self._drop_dead_jobs()
            self._apply_promotions()
            running = self._batch.n > 0
            new = []
            if not running or self._queue.admits_while_running:
                # the last max_batch resident rows are kept for newcomers, one row each: a request whose images
                # fill the running batch cannot make the next one wait for its chains to end
                free, reserve = self._batch.free, (self.max_batch if self.max_resident > self.max_batch else 0)
                new = self._queue.take(max(0, free - reserve))
                if self._queue and free > len(new):
                    new += self._queue.take_first(free - len(new))
        if new:
            try:
                self._fault("admit")
                self._start(new)
            except Exception as exc:
                self._on_fault("admit", exc, [job for job, _ in new])
                raise _StageFailed from exc
        return self._batch if self._batch.n > 0 else None

    def _start(self, new: list[tuple[Job, int]]) -> None:
        """Draw x_T for the new images (or, for SDEdit, noise the input to the chain's first level) and
        add them to the running batch: per-image work happens here, when images join, not per iteration."""
        new = [(job, k) for job, k in new if not job.done]
        if not new:
            return
        seeds = host_to_device([job.keys[k] for job, k in new], self.device, torch.int64)
        x = self.iteration.start_x(self._batch, new, seeds)
        now, clock = time.monotonic(), self.iterations
        with self._lock:
            self._batch.add(new, x, seeds, clock)
            for job, _ in new:
                job.rows_running += 1
                if job.on_progress is not None:
                    self._streaming[job.id] = job
                if job.previews and job.on_preview is not None:
                    self._previewing[job.id] = job
                if job.first_admitted is None:
                    job.first_admitted = now
                    self._observe("on_admitted", job)

    def _schedule(self, batch: ServedBatch) -> int:
        """How many rows advance this iteration; those rows moved to the front (step_scheduler.py). All of
        them, untouched, unless the batch holds more than a U-Net call takes or some row has a deadline."""
        n = batch.n
        call = self.call_size.rows(batch.unet_row_count(n), self.cost)  # of U-Net rows, as costs are
        tight = self._tight_deadline
        limit = iteration_limit(tight[0], self.cost, call) if tight is not None and tight[1] >= time.monotonic() else None
        now, remaining = self.clock(), batch.pos_host[:n] + 1
        soft = slowdown_limit(batch.soft_due_host[:n], batch.soft_step_host[:n], batch.priority_host[:n], remaining, now) if n > 1 else None
        if soft is not None:
            limit = soft if limit is None else min(limit, soft)
        weight = batch.unet_rows()
        rows = call if weight is not None and call < self.max_batch else None  # the full batch stays max_batch samples
        choice = choose(n, call, batch.priority_host, batch.due_host, remaining, batch.waited_host, now, self.cost,
                        self.starve_after, limit, weight, batch.job_host, rows)  # fmt: skip
        count = n if choice is None else choice.count
        if choice is not None:
            with self._lock:
                batch.move_to_front(choice.rows, choice.count)
        self._iteration_ends = time.monotonic() + (self.cost.seconds(batch.unet_row_count(count)) or 0.0)
        return count

    def _eps(self, batch: ServedBatch, m: int | None = None) -> tuple[StepInputs, torch.Tensor]:
        return self.iteration.eps(batch, m)

    def _step(self, batch: ServedBatch, m: int, inputs: StepInputs, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        stepped = self.iteration.step(batch, m, inputs, eps)
        if self._previewing:  # before the advance: the batch still holds x_t
            self._previews(batch, m, inputs, eps)
        return stepped

    def _previews(self, batch: ServedBatch, m: int, inputs: StepInputs, eps: torch.Tensor) -> None:
        """The partial images due after this iteration, on their way to the host (``_deliver_previews`` hands them over)."""
        due = previews.wanted(batch, m)
        if not due:
            return
        host, event = self._to_host(previews.x0_hat(batch.x[:m], eps, inputs, [row for row, *_ in due]))
        self._preview_readouts.append(_PreviewReadout(host, [(job, k, index) for _, job, k, index in due], event))

    def _deliver_previews(self, wait: bool) -> None:
        """Partial images to their jobs once their copy is complete (before the images after them: a stream shows
        them first)."""
        while self._preview_readouts:
            readout = self._preview_readouts[0]
            if not _copied(readout.event, wait):
                return
            self._preview_readouts.pop(0)
            for (job, k, index), image in zip(readout.owners, readout.images, strict=True):
                if not job.done:
                    self._callback(job, lambda j, k=k, index=index, image=image: j.on_preview(j, k, index, image))  # type: ignore[misc]

    def _advance(self, batch: ServedBatch, new_x: torch.Tensor, x0: torch.Tensor | None, seconds: float) -> None:
        """Move every row one step on, retire those at x_0 (their images leave the device in one copy),
        and tell the jobs. Which rows finish is known on the host: nothing is read back to decide it."""
        m = new_x.shape[0]
        finishing = batch.finishing(m)
        readout = self._read_out(batch, new_x, finishing) if finishing.size else None
        self._fault("advance")
        with self._lock:
            if batch.n > m:  # rows that sat this iteration out, by priority
                priorities, counts = np.unique(batch.priority_host[m : batch.n], return_counts=True)
                self._observe("on_preempted", dict(zip(priorities.tolist(), counts.tolist(), strict=True)))
            batch.advance(new_x, x0)
            self.iterations += 1  # counters and gauges are current before anyone is told
            rows = batch.unet_row_count(m)  # the call's rows: a guided row is two
            if self._cold is None or rows in self._cold:
                self.cost.observe(rows, seconds)
            else:  # warm-up: a size's first call builds its primitives and grows the allocator, not its cost
                self._cold.add(rows)
            if readout is not None:
                self._leave(batch, finishing)
                self._readouts.append(readout)
            self._observe("on_iteration", m, seconds)
            self._observe("on_load", self._queue.images, batch.n)
        self._deliver(wait=batch.n == 0 or self.device.type != "cuda")
        for job in self._progress_jobs(batch):
            self._callback(job, job.on_progress)  # type: ignore[arg-type]

    def _read_out(self, batch: ServedBatch, new_x: torch.Tensor, rows: np.ndarray) -> _Readout:
        """The finished rows' images on their way to the host: one gather and one copy (non-blocking into
        pinned memory on CUDA, waited for by an event when they are delivered, an iteration later)."""
        owners = [batch.owners[int(r)] for r in rows]
        host, event = self._to_host(new_x[host_to_device(rows, self.device, torch.int64)])
        return _Readout(host, owners, event)

    def _to_host(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``images`` as float32 on the host: on CUDA a non-blocking copy into pinned memory and the event after which
        it is complete (no device sync in the iteration), elsewhere the tensor itself."""
        if self.device.type != "cuda":
            return images.float(), None
        host = torch.empty(images.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(images, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _leave(self, batch: ServedBatch, rows: np.ndarray | list[int]) -> None:
        """Rows leave the batch (finished, failed, cancelled): their jobs' step counts banked (the lock held)."""
        for r in rows:
            job, _ = batch.owners[int(r)]
            job.rows_running -= 1
            job.steps_banked += int(batch.calls_host[int(r)] - 1 - batch.pos_host[int(r)])
        batch.remove(rows)

    def _deliver(self, wait: bool) -> None:
        """Finished images to their jobs, once their copy to the host is complete (``wait``: wait for it)."""
        self._deliver_previews(wait)
        while self._readouts:
            readout = self._readouts[0]
            if not _copied(readout.event, wait):
                return
            self._readouts.pop(0)
            done: dict[int, Job] = {}
            finite = finite_rows(readout.images)  # on the host: no device read
            with self._lock:
                self._fail_non_finite(readout, finite)
                for i, (job, k) in enumerate(readout.owners):
                    if job.done:  # failed or cancelled meanwhile
                        continue
                    if job.n == 1:  # the readout's own row: a view on CPU, a copy out of pinned memory on CUDA
                        row = readout.images[i : i + 1]
                        job.images = row.clone() if readout.event is not None else row
                    else:
                        assert job.images is not None
                        job.images[k] = readout.images[i]
                    job.images_done += 1
                    if job.images_done == job.n:
                        done[job.id] = job
                for job in done.values():
                    self._finish(job)

    def _fail_non_finite(self, readout: _Readout, finite: list[bool]) -> None:
        """Fail the jobs with an image of NaN or infinity in ``readout`` (the lock held), naming the images; counted and
        logged as a fault of stage ``output``, without marking the engine unhealthy: the model works for other seeds (one
        that fails for every input fails the self-test as well)."""
        bad: dict[int, tuple[Job, list[int]]] = {}
        for (job, k), ok in zip(readout.owners, finite, strict=True):
            if not ok and not job.done:
                bad.setdefault(job.id, (job, []))[1].append(job.request.first + k)
        for job, images in bad.values():
            error = NonFiniteImages(sorted(images))
            log.error("job %s: %s", job.id, error, extra={"fields": {"stage": "output", "request_id": job.request_id}})
            self._observe("on_fault", "output", 1)
            self._fail_jobs([job], error)

    def stream_progress(self, job: Job) -> None:
        """Report ``job``'s progress (its ``on_progress``, set now) every iteration from the next on, though it was
        admitted without: a stream began to wait on it (an identical request's job: service/api/in_flight.py)."""
        self._new_streams.append(job)  # thread-safe; the engine's thread moves it into _streaming

    def _progress_jobs(self, batch: ServedBatch) -> list[Job]:
        """The running jobs that stream their progress (few: only a stream reads it)."""
        while self._new_streams:
            job = self._new_streams.popleft()
            if not job.done:
                self._streaming[job.id] = job
        return [job for job in self._streaming.values() if not job.done] if self._streaming else []

    # --- health, beside the loop -------------------------------------------------------------------
    def _fault(self, stage: str) -> None:
        if self.faults is not None:
            self.faults(stage)

    @torch.inference_mode()
    def _self_test(self) -> None:
        """One sample's last step through the U-Net and the fused step, off the books (no job, no
        metrics): readiness heals when the model works again, without waiting for traffic."""
        self.health.self_tests += 1
        probe = Job(ImageRequest(0, 1, ChainSpec(1)), timeout_s=60)
        seeds = seeds_to_tensor([image_seeds(0, 1)[0]], self.device)
        batch = self._new_batch(1)
        batch.add([(probe, 0)], sample_noise(seeds, 0, self.shape), seeds, 0)
        try:
            inputs, eps = self._eps(batch, 1)
            out, _ = self._step(batch, 1, inputs, eps)
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
        # a warm-up's failure is raised by warmup() (the model fails to load, or the compile thread stays eager) and logged there
        level = logging.DEBUG if self._cold is not None else logging.ERROR
        log.log(level, "engine fault in stage %s: %d job(s) failed", stage, len(unique), exc_info=exc, extra={"fields": fields})
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
    def _apply_promotions(self) -> None:
        """The resident rows of the jobs promoted since the last admission take their job's priority now."""
        batch, n = self._batch, self._batch.n
        for job in self._promoted:
            batch.priority_host[:n][batch.job_host[:n] == job.id] = job.priority
        self._promoted.clear()

    def _drop_dead_jobs(self) -> None:
        """The jobs cancelled since the last iteration, and those past their deadline (the heap's top):
        no walk over every job in flight."""
        while self._cancelled:
            self._fail_jobs([self._cancelled.popleft()], Cancelled("the client went away"))
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] < now:
            _, _, job = heapq.heappop(self._deadlines)
            if not job.done:
                self._fail_jobs([job], DeadlineExceeded(f"deadline of {job.timeout_s:g} s exceeded"))
        while self._deadlines and self._deadlines[0][2].done:  # finished jobs leave the heap as they reach its top
            heapq.heappop(self._deadlines)

    def _jobs_in_flight(self) -> list[Job]:
        jobs = {job.id: job for job in self._queue.jobs()}
        jobs.update({job.id: job for job, _ in self._batch.owners})
        jobs.update({job.id: job for readout in self._readouts for job, _ in readout.owners if not job.done})
        return list(jobs.values())

    def _fail_jobs(self, jobs: list[Job], error: EngineError) -> None:
        jobs = [job for job in jobs if not job.done]
        if not jobs:
            return
        ids = {job.id for job in jobs}
        for job in jobs:
            job.error = error
        self._queue.remove(jobs)
        self._leave(self._batch, self._batch.rows_of(ids))
        self._observe("on_load", self._queue.images, self.running)
        for job in jobs:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.done:
            return
        job.finished = time.monotonic()
        self._live.discard(job.id)
        self._streaming.pop(job.id, None)
        self._previewing.pop(job.id, None)
        self._observe("on_job_done", job)
        if job.on_done is not None:
            self._callback(job, job.on_done)

    @staticmethod
    def _callback(job: Job, fn: Callable[[Job], None]) -> None:
        try:
            fn(job)
        except Exception as exc:  # e.g. the event loop that waits for it has closed
            log.error("job callback failed", exc_info=exc, extra={"fields": {"stage": "callback", "request_id": job.request_id}})
