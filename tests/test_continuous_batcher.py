"""The engine alone (no HTTP): step-level batching, parity with the offline sampler, removal of work."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from service.engine.engine import Engine
from service.engine.errors import (
    Cancelled,
    DeadlineExceeded,
    Draining,
    DrainTimeout,
    EngineFault,
    EngineStopped,
    ModelFailure,
    NonFiniteImages,
    QueueFull,
)
from service.engine.job import Job
from service.engine.observer import EngineObserver
from tests.batch_rounding import BATCH_ROUNDING
from tests.engine_jobs import wait_done
from tests.tiny_model import tiny_loaded_model


def _job(seed: int = 0, n: int = 1, steps: int = 10, timeout_s: float = 60.0, clip: bool = True) -> Job:
    return Job(ImageRequest(seed, n, ChainSpec(steps=steps, clip=clip)), timeout_s=timeout_s)


@pytest.fixture
def engine(tiny_unet: torch.nn.Module) -> Iterator[Engine]:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=8, max_queue=64)
    e.start()
    yield e
    e.stop()


def test_engine_matches_offline_sampler(engine: Engine, tiny_unet: torch.nn.Module) -> None:
    job = engine.submit(_job(seed=7, n=3, steps=25))
    wait_done(job)
    assert job.error is None and job.images is not None
    with torch.inference_mode():
        offline = sample(tiny_unet, engine.model.schedule, seeds_to_tensor(image_seeds(7, 3)), (1, 8, 8), steps=25)
    assert (job.images - offline).abs().max().item() < BATCH_ROUNDING


def test_same_seed_alone_and_in_a_mixed_batch(engine: Engine) -> None:
    alone = engine.submit(_job(seed=11, n=2, steps=30))
    wait_done(alone)
    crowd = [engine.submit(_job(seed=s, n=3, steps=st, clip=c)) for s, st, c in [(1, 50, True), (2, 13, False), (3, 1000, True)]]
    time.sleep(0.05)
    mixed = engine.submit(_job(seed=11, n=2, steps=30))
    wait_done(mixed, *crowd[:2])
    crowd[2].cancel()
    assert (alone.images - mixed.images).abs().max().item() < BATCH_ROUNDING  # type: ignore[operator]


MIXED = [  # (seed, n, sampler, steps, eta, spacing, clip)
    (21, 2, "dpmsolver++", 12, 0.0, "trailing", False),
    (22, 2, "ddim", 17, 0.6, "leading", True),
    (23, 1, "ddpm", 30, 0.0, "linspace", True),
    (24, 2, "dpmsolver++", 5, 0.0, "linspace", True),
    (25, 1, "ddim", 9, 0.0, "trailing", False),
]


def test_mixed_samplers_share_iterations_and_match_the_offline_sampler(tiny_unet: torch.nn.Module) -> None:
    """Three samplers, their step counts, eta, spacing and clip in one running batch, joining at different
    iterations: every image equals the offline chain of its own (seed, k, sampler, steps, eta, spacing)."""
    calls: list[int] = []
    model = tiny_loaded_model(tiny_unet)
    inner = model.eps_model
    model.eps_model = lambda x, t: (calls.append(x.shape[0]), inner(x, t))[1]  # type: ignore[method-assign]
    e = Engine(model, max_batch=16, max_queue=64)
    e.start()
    try:
        jobs = []
        for seed, n, sampler, steps, eta, spacing, clip in MIXED:
            job = Job(ImageRequest(seed, n, ChainSpec(steps=steps, clip=clip, sampler=sampler, eta=eta, spacing=spacing)), timeout_s=60)
            jobs.append(e.submit(job))
            time.sleep(0.01)  # later jobs join a batch already running
        wait_done(*jobs)
    finally:
        e.stop()
    assert max(calls) >= 6  # samplers did share U-Net calls
    with torch.inference_mode():
        for job, (seed, n, sampler, steps, eta, spacing, clip) in zip(jobs, MIXED, strict=True):
            assert job.error is None and job.images is not None
            offline = sample(tiny_unet, model.schedule, seeds_to_tensor(image_seeds(seed, n)), (1, 8, 8), steps=steps,
                             sampler=sampler, eta=eta, spacing=spacing, clip_denoised=clip)  # fmt: skip
            # relative: the random tiny U-Net's unclipped chains grow to ~1e2 (batched-kernel rounding only)
            assert (job.images - offline).abs().max().item() / max(1.0, offline.abs().max().item()) < BATCH_ROUNDING, (sampler, steps)
    # the samplers differ from one another on the same seed (the field is not ignored)
    assert len({tuple(j.images[0].flatten()[:8].tolist()) for j in jobs}) == len(jobs)  # type: ignore[index]


def test_a_bad_chain_is_refused_at_submit(engine: Engine) -> None:
    with pytest.raises(ValueError, match="is not a valid Sampler"):
        engine.submit(Job(ImageRequest(0, 1, ChainSpec(steps=10, clip=True, sampler="euler")), timeout_s=5))
    with pytest.raises(ValueError, match="leaves"):
        engine.submit(Job(ImageRequest(0, 1, ChainSpec(steps=1000, clip=True, spacing="leading", steps_offset=1)), timeout_s=5))
    assert engine.queue_depth == 0


def test_short_request_overtakes_a_long_one(engine: Engine) -> None:
    long = engine.submit(_job(seed=1, steps=1000))
    while engine.iterations < 5:
        time.sleep(0.001)
    short, finished_at = _job(seed=2, steps=10), []
    short.on_done = lambda job: finished_at.append(engine.iterations)  # exact, not the poll's view
    engine.submit(short)
    start_iter = engine.iterations  # read after the submit: a test thread descheduled between the two (a loaded CI
    # machine) saw 13 iterations, the engine's running on before the job existed
    wait_done(short)
    assert not long.done
    assert finished_at[0] - start_iter <= 12  # ~10 iterations, shared with the long chain
    wait_done(long)
    assert long.error is None


def test_request_level_batching_makes_the_short_one_wait(tiny_unet: torch.nn.Module) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=8, scheduling="request")
    e.start()
    try:
        long = e.submit(_job(seed=1, steps=200))
        while e.iterations < 2:
            time.sleep(0.001)
        short = e.submit(_job(seed=2, steps=10))
        wait_done(short)
        assert long.done  # the short one only ran after the whole long chain
    finally:
        e.stop()


def test_large_job_does_not_starve_small_ones(tiny_unet: torch.nn.Module) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=4)
    big = e.submit(_job(seed=1, n=20, steps=5))
    small = e.submit(_job(seed=2, n=1, steps=5))
    e.start()
    try:
        wait_done(small)
        assert not big.done and big.images_done < 20
        assert small.queue_wait is not None and small.queue_wait < big.timeout_s
        wait_done(big)
    finally:
        e.stop()


def test_queue_full_and_draining(tiny_unet: torch.nn.Module) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=1, max_queue=3)  # not started: nothing is admitted
    e.submit(_job(n=2))
    with pytest.raises(QueueFull):
        e.submit(_job(n=2))
    e.submit(_job(n=1))
    assert e.queue_depth == 3
    e.drain()
    with pytest.raises(Draining):
        e.submit(_job(n=1))
    # the first request of a connection accepted before the listeners closed (service/api/drain_admission.py)
    drained = Engine(tiny_loaded_model(tiny_unet), max_batch=1, max_queue=3)
    drained.drain()
    routed = _job(n=1)
    routed.routed_before_drain = True
    assert drained.submit(routed) is routed and drained.queue_depth == 1
    with pytest.raises(Draining):
        drained.submit(_job(n=1))
    with pytest.raises(ValueError, match="steps"):
        Engine(tiny_loaded_model(tiny_unet)).submit(_job(steps=1001))


def test_cancel_frees_samples(engine: Engine) -> None:
    job = engine.submit(_job(n=4, steps=1000))
    while engine.running < 4:
        time.sleep(0.001)
    job.cancel()
    wait_done(job)
    assert isinstance(job.error, Cancelled)
    time.sleep(0.05)
    assert engine.running == 0 and engine.queue_depth == 0 and engine.idle


def test_deadline(engine: Engine) -> None:
    job = engine.submit(_job(n=2, steps=1000, timeout_s=0.2))
    ok = engine.submit(_job(seed=3, n=1, steps=5))
    wait_done(job, ok)
    assert isinstance(job.error, DeadlineExceeded) and ok.error is None
    time.sleep(0.05)
    assert engine.running == 0


def test_model_failure_fails_only_that_batch(tiny_unet: torch.nn.Module) -> None:
    calls = {"n": 0, "fail": True}

    def flaky(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["fail"] and calls["n"] == 3:
            raise RuntimeError("injected fault")
        return tiny_unet(x, t)

    model = tiny_loaded_model(tiny_unet)
    model.eps_model = flaky
    e = Engine(model, max_batch=8)
    e.start()
    try:
        bad = e.submit(_job(seed=1, steps=10))
        wait_done(bad)
        assert isinstance(bad.error, ModelFailure) and bad.error.cause == "RuntimeError: injected fault"
        assert str(bad.error) == "model call failed (RuntimeError); the server log has the details"  # no message text to clients
        assert not e.healthy
        good = e.submit(_job(seed=2, steps=10))
        wait_done(good)
        assert good.error is None and e.healthy
    finally:
        e.stop()


def test_an_image_that_ends_in_nan_fails_its_request_naming_it_not_answered_black(tiny_unet: torch.nn.Module) -> None:
    """A U-Net that overflows (fp16) for some inputs: the chain's NaN was cast to 0 by the PNG encoder, a black square
    answered 200. Now the request fails (EngineFault: 500) naming the images; the others in the batch, and the engine's
    health, are untouched."""
    seeds = seeds_to_tensor(image_seeds(5, 4))
    poisoned = set(torch.flatten(sample_noise(seeds, 0, (1, 8, 8)), 1)[:, 0].tolist()[1:3])  # x_T's first pixel: images 1, 2

    model = tiny_loaded_model(tiny_unet)

    def overflowing(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = tiny_unet(x, t)
        if (t == t.max()).all() and x.shape[0]:  # the chain's first call: x is x_T, whose first pixel names the image
            for i, v in enumerate(x.flatten(1)[:, 0].tolist()):
                if v in poisoned:
                    eps[i] = float("nan")
        return eps

    model.eps_model = overflowing
    observer = _Faults()
    e = Engine(model, max_batch=8, observer=observer)
    e.start()
    try:
        bad, good = e.submit(_job(seed=5, n=4, steps=4)), e.submit(_job(seed=6, n=2, steps=4))
        wait_done(bad, good)
        assert isinstance(bad.error, NonFiniteImages) and bad.error.stage == "output"
        assert str(bad.error).startswith("the model's output was not finite (NaN or infinity) for images 1, 2 of this seed: ")
        assert good.error is None and torch.isfinite(good.images).all()  # type: ignore[arg-type]
        assert e.healthy and observer.faults == [("output", 1)]
        part = e.submit(Job(ImageRequest(5, 2, ChainSpec(steps=4), first=2), timeout_s=60))  # images 2, 3: the index is the seed's
        wait_done(part)
        assert str(part.error).startswith("the model's output was not finite (NaN or infinity) for image 2 of this seed")
    finally:
        e.stop()


class _Faults(EngineObserver):
    def __init__(self) -> None:
        self.faults: list[tuple[str, int]] = []

    def on_fault(self, stage: str, jobs: int) -> None:
        self.faults.append((stage, jobs))


def test_progress_callbacks(engine: Engine) -> None:
    seen: list[int] = []
    job = _job(n=2, steps=6)
    job.on_progress = lambda j: seen.append(j.steps_done)
    engine.submit(job)
    wait_done(job)
    assert seen == sorted(seen) and seen[-1] < 12 and job.steps_done == 12 and job.progress == 1.0


# --- faults: any stage of an iteration fails exactly the jobs it touched, and the engine goes on ----------


class OneFault:
    """Raises once at ``stage``, the first time ``when()`` holds there (a stand-in for FaultInjector)."""

    def __init__(self, stage: str, when=lambda: True) -> None:  # type: ignore[no-untyped-def]
        self.stage, self.when, self.fired = stage, when, False

    def __call__(self, stage: str) -> None:
        if stage == self.stage and not self.fired and self.when():
            self.fired = True
            raise MemoryError(f"injected at {stage}")


@pytest.mark.parametrize("stage", ["unet", "step", "advance"])
def test_a_fault_in_the_running_batch_fails_its_jobs_only(tiny_unet: torch.nn.Module, stage: str) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=2, self_test_backoff_s=(0.05, 0.2))
    running = e.submit(_job(seed=1, n=2, steps=300))  # fills the batch
    e.start()
    try:
        while e.running < 2:
            time.sleep(0.001)
        waiting = e.submit(_job(seed=2, n=1, steps=5))  # not admitted until a slot frees
        e.faults = OneFault(stage)
        wait_done(running, waiting)
        assert isinstance(running.error, EngineFault) and running.error.stage == stage
        assert "MemoryError" in str(running.error) and waiting.error is None
        after = e.submit(_job(seed=3, n=2, steps=5))  # the engine goes on
        wait_done(after)
        assert after.error is None and e.healthy and e.alive
        assert e.running == 0 and e.queue_depth == 0 and e.idle
    finally:
        e.stop()


def test_a_fault_while_admitting_fails_only_the_newcomers(tiny_unet: torch.nn.Module) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=8)
    first = e.submit(_job(seed=1, n=2, steps=300))
    e.start()
    try:
        while e.running < 2:
            time.sleep(0.001)
        e.faults = OneFault("admit")  # x_T for the next newcomers cannot be drawn (e.g. out of memory)
        late = e.submit(_job(seed=2, n=3, steps=5))
        wait_done(late)
        assert isinstance(late.error, EngineFault) and late.error.stage == "admit"
        wait_done(first)
        assert first.error is None and first.images_done == 2
        assert e.running == 0 and e.queue_depth == 0
    finally:
        e.stop()


def test_a_failing_observer_is_isolated(tiny_unet: torch.nn.Module) -> None:
    class Broken(EngineObserver):
        def __init__(self) -> None:
            self.faults: list[str] = []

        def on_iteration(self, batch_size: int, seconds: float) -> None:
            raise ValueError("metrics backend down")

        def on_fault(self, stage: str, jobs: int) -> None:
            self.faults.append(stage)

    observer = Broken()
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=4, observer=observer)
    e.start()
    try:
        job = e.submit(_job(seed=1, n=2, steps=5))
        wait_done(job)
        assert job.error is None and job.images_done == 2 and e.healthy
        assert observer.faults == ["observer"] * 5
    finally:
        e.stop()


def test_a_dead_engine_answers_everyone_and_says_so(tiny_unet: torch.nn.Module) -> None:
    died: list[str] = []
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=2, on_dead=died.append)
    jobs = [e.submit(_job(seed=s, n=2, steps=50)) for s in range(3)]  # one running, two waiting
    e.faults = OneFault("loop", when=lambda: e.iterations >= 3)  # outside any iteration: a bug in the loop
    e.start()
    wait_done(*jobs, timeout=10)
    assert all(isinstance(j.error, EngineStopped) for j in jobs)
    end = time.monotonic() + 5
    while e.alive:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert e.dead is not None and "injected at loop" in e.dead and died == [e.dead]
    with pytest.raises(EngineStopped):
        e.submit(_job())
    assert e.running == 0 and e.queue_depth == 0


def test_readiness_heals_without_traffic(tiny_unet: torch.nn.Module) -> None:
    failures = {"left": 3}  # the fault and then two failing self-tests: backoff 0.05, 0.1, 0.2 s

    def faults(stage: str) -> None:
        if stage == "unet" and failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("device fault")

    e = Engine(tiny_loaded_model(tiny_unet), max_batch=2, self_test_backoff_s=(0.05, 1.0), faults=faults)
    e.start()
    try:
        bad = e.submit(_job(seed=1, steps=5))
        wait_done(bad)
        assert isinstance(bad.error, ModelFailure) and not e.healthy
        end = time.monotonic() + 5
        while not e.healthy:  # nobody sends a request: the self-test is what heals it
            assert time.monotonic() < end, "readiness did not heal"
            time.sleep(0.01)
        assert e.self_tests == 3 and failures["left"] == 0
        assert e.iterations == 0  # self-tests are off the books
    finally:
        e.stop()


def test_abort_answers_everything_in_flight(engine: Engine) -> None:
    jobs = [engine.submit(_job(seed=s, n=4, steps=1000)) for s in range(4)]  # 8 running, 8 waiting
    while engine.running < 8:
        time.sleep(0.001)
    assert engine.abort(DrainTimeout("deadline")) == 4
    assert all(j.done and isinstance(j.error, DrainTimeout) for j in jobs)
    time.sleep(0.05)  # an iteration that was under way when abort ran must not bring their rows back
    assert engine.running == 0 and engine.queue_depth == 0 and engine.idle
    after = engine.submit(_job(seed=9, steps=5))
    wait_done(after)
    assert after.error is None


def test_admission_is_fair_per_client(tiny_unet: torch.nn.Module) -> None:
    # client A floods: 5 jobs of 4 images (5-step chains) on a 4-slot batch. B's single image must take
    # one of the first slots that free up (iteration 5), not wait behind A's backlog: round robin per
    # job alone would put B behind A's five queued jobs (iteration 10)
    class AdmittedAt(EngineObserver):
        def __init__(self) -> None:
            self.at: dict[str, int] = {}

        def on_admitted(self, job: Job) -> None:
            self.at.setdefault(job.client, e.iterations)

    admitted = AdmittedAt()
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=4, observer=admitted)
    flood = [e.submit(Job(ImageRequest(s, 4, ChainSpec(steps=5, clip=True)), timeout_s=60, client="A")) for s in range(5)]
    e.start()
    try:
        while e.iterations < 1:
            time.sleep(0.001)
        single = e.submit(Job(ImageRequest(99, 1, ChainSpec(steps=5, clip=True)), timeout_s=60, client="B"))
        wait_done(single, *flood)
        assert admitted.at == {"A": 0, "B": 5}
        assert single.error is None and all(j.error is None for j in flood)
    finally:
        e.stop()
