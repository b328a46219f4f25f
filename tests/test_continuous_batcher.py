"""The engine alone (no HTTP): step-level batching, parity with the offline sampler, removal of work."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from ddpm.sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.continuous_batcher import Cancelled, DeadlineExceeded, Draining, Engine, Job, ModelFailure, QueueFull
from tests.tiny_model import tiny_loaded_model


def _job(seed: int = 0, n: int = 1, steps: int = 10, timeout_s: float = 60.0, clip: bool = True) -> Job:
    return Job(seed=seed, n=n, steps=steps, clip_denoised=clip, timeout_s=timeout_s)


def _wait(*jobs: Job, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not all(j.done for j in jobs):
        assert time.monotonic() < end, "jobs did not finish"
        time.sleep(0.005)


@pytest.fixture
def engine(tiny_unet: torch.nn.Module) -> Iterator[Engine]:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=8, max_queue=64)
    e.start()
    yield e
    e.stop()


def test_engine_matches_offline_sampler(engine: Engine, tiny_unet: torch.nn.Module) -> None:
    job = engine.submit(_job(seed=7, n=3, steps=25))
    _wait(job)
    assert job.error is None and job.images is not None
    with torch.inference_mode():
        offline = sample(tiny_unet, engine.model.schedule, seeds_to_tensor(image_seeds(7, 3)), (1, 8, 8), steps=25)
    assert (job.images - offline).abs().max().item() < 1e-5


def test_same_seed_alone_and_in_a_mixed_batch(engine: Engine) -> None:
    alone = engine.submit(_job(seed=11, n=2, steps=30))
    _wait(alone)
    crowd = [engine.submit(_job(seed=s, n=3, steps=st, clip=c)) for s, st, c in [(1, 50, True), (2, 13, False), (3, 1000, True)]]
    time.sleep(0.05)
    mixed = engine.submit(_job(seed=11, n=2, steps=30))
    _wait(mixed, *crowd[:2])
    crowd[2].cancel()
    assert (alone.images - mixed.images).abs().max().item() < 1e-5  # type: ignore[operator]


def test_short_request_overtakes_a_long_one(engine: Engine) -> None:
    long = engine.submit(_job(seed=1, steps=1000))
    while engine.iterations < 5:
        time.sleep(0.001)
    short = engine.submit(_job(seed=2, steps=10))
    start_iter = engine.iterations
    _wait(short)
    assert not long.done
    assert engine.iterations - start_iter <= 12  # ~10 iterations, shared with the long chain
    _wait(long)
    assert long.error is None


def test_request_level_batching_makes_the_short_one_wait(tiny_unet: torch.nn.Module) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=8, scheduling="request")
    e.start()
    try:
        long = e.submit(_job(seed=1, steps=200))
        while e.iterations < 2:
            time.sleep(0.001)
        short = e.submit(_job(seed=2, steps=10))
        _wait(short)
        assert long.done  # the short one only ran after the whole long chain
    finally:
        e.stop()


def test_large_job_does_not_starve_small_ones(tiny_unet: torch.nn.Module) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=4)
    big = e.submit(_job(seed=1, n=20, steps=5))
    small = e.submit(_job(seed=2, n=1, steps=5))
    e.start()
    try:
        _wait(small)
        assert not big.done and big.images_done < 20
        assert small.queue_wait is not None and small.queue_wait < big.timeout_s
        _wait(big)
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
    with pytest.raises(ValueError, match="steps"):
        Engine(tiny_loaded_model(tiny_unet)).submit(_job(steps=1001))


def test_cancel_frees_samples(engine: Engine) -> None:
    job = engine.submit(_job(n=4, steps=1000))
    while engine.running < 4:
        time.sleep(0.001)
    job.cancel()
    _wait(job)
    assert isinstance(job.error, Cancelled)
    time.sleep(0.05)
    assert engine.running == 0 and engine.queue_depth == 0 and engine.idle


def test_deadline(engine: Engine) -> None:
    job = engine.submit(_job(n=2, steps=1000, timeout_s=0.2))
    ok = engine.submit(_job(seed=3, n=1, steps=5))
    _wait(job, ok)
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
        _wait(bad)
        assert isinstance(bad.error, ModelFailure) and "injected fault" in str(bad.error)
        assert not e.healthy
        good = e.submit(_job(seed=2, steps=10))
        _wait(good)
        assert good.error is None and e.healthy
    finally:
        e.stop()


def test_progress_callbacks(engine: Engine) -> None:
    seen: list[int] = []
    job = _job(n=2, steps=6)
    job.on_progress = lambda j: seen.append(j.steps_done)
    engine.submit(job)
    _wait(job)
    assert seen == sorted(seen) and seen[-1] < 12 and job.steps_done == 12 and job.progress == 1.0
