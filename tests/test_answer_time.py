"""A deadline keeps room for the answer after the images (service/engine/answer_time.py, issue 37): the
engine measures how long an answer takes once its images are done, plans a request's images to be done
that much (with its spread, and a margin) before its deadline, counts the deadline from arrival, and
refuses a request that cannot make it at once."""

from __future__ import annotations

import time

import pytest

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from service.engine.answer_time import FORGET_AFTER_S, AnswerTime, K
from service.engine.engine import Engine
from service.engine.errors import DeadlineUnmeetable
from service.engine.iteration_cost import IterationCost
from service.engine.job import Job
from tests.app_client import app_client, metric, wait_ready
from tests.tiny_model import random_tiny_unet, tiny_loaded_model


def test_the_reserve_covers_the_answer_times_spread_not_their_mean() -> None:
    answer = AnswerTime(margin_s=0.005)
    assert answer.reserve_s == 0.005  # nothing measured yet: the margin alone
    answer.observe(0.002)
    assert answer.reserve_s == pytest.approx(0.002 + K * 0.001 + 0.005)  # RFC 6298's first sample: deviation = half
    for _ in range(60):
        answer.observe(0.002)
    assert answer.reserve_s == pytest.approx(0.007, abs=1e-5)  # a steady time: the deviation decays
    spread = AnswerTime()
    for i in range(200):
        spread.observe(0.001 if i % 2 else 0.005)
    assert spread.reserve_s > 0.005  # above the slower answers, not at the 3 ms mean
    spread.observe(-1.0)  # a clock oddity is no negative time
    assert spread.mean is not None and spread.mean > 0
    assert spread.kept_of(1.0) == spread.reserve_s and spread.kept_of(0.004) == 0.002  # at most half a deadline


def test_a_slow_answer_cannot_make_every_deadline_refused() -> None:
    """With the reserve unbounded, a reserve over every deadline would refuse every request with one, and
    none would be answered to bring it down."""
    engine = _engine_with_work()
    engine.answer_time.observe(5.0)  # one answer took 5 s: a reserve of 15 s
    job = engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=1.3))  # 0.6 s of work
    assert job.reserve_s == pytest.approx(0.65)

    stale = _engine_with_work()
    stale.answer_time.observe(0.4, at=time.monotonic() - FORGET_AFTER_S - 1)  # long ago, and nothing since
    fits = stale.submit(Job(ImageRequest(3, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.7))  # 0.6 s + 0.4 s
    assert fits.reserve_s == 0.0 and stale.answer_time.mean is None  # admitted on the engine's time; measured afresh
    stale.answer_time.observe(0.4)  # a fresh one refuses again: 0.6 s + 0.35 (half the deadline); priority -1: nothing resident is ahead
    with pytest.raises(DeadlineUnmeetable, match=r"alone on this replica it would take ~0\.85 s"):  # its 0.5 s + 0.35 (no wait helps)
        stale.submit(Job(ImageRequest(4, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.7, priority=-1))


def _engine_with_work() -> Engine:
    """An engine with 2 resident rows without a deadline and a set cost: a 10-call 1-image job with a deadline
    is predicted to take 0.1 s (the iteration in flight) + 10 x 0.05 s = 0.6 s."""
    engine = Engine(tiny_loaded_model(random_tiny_unet()), max_batch=2, max_resident=4)
    engine.submit(Job(ImageRequest(1, 2, ChainSpec(100, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = IterationCost()
    for rows in (1, 2):
        engine.cost.observe(rows, 0.05 * rows)
    engine.cost.alpha = 0.0
    engine._iteration_ends = time.monotonic() + 0.1
    return engine


def test_admission_keeps_the_answers_time_of_the_deadline() -> None:
    accepted = _engine_with_work().submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.7))
    assert accepted.reserve_s == 0.0 and accepted.due == pytest.approx(accepted.created + 0.7)  # nothing measured: 0.6 s fits
    engine = _engine_with_work()
    for _ in range(60):
        engine.answer_time.observe(0.2)  # answers take 0.2 s after their images (the reserve: 0.2 s, no spread)
    with pytest.raises(DeadlineUnmeetable) as refused:
        engine.submit(Job(ImageRequest(3, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.7))
    assert "~0.80 s" in str(refused.value)  # 0.6 s of work and 0.2 s of answer
    job = engine.submit(Job(ImageRequest(4, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=2.0))
    assert job.reserve_s == pytest.approx(0.2, abs=1e-3)
    assert job.due == pytest.approx(job.created + 2.0 - job.reserve_s)  # the scheduler plans the images 0.2 s earlier
    while job.first_admitted is None:
        engine._iterate()
    row = [owner for owner, _ in engine._batch.owners[: engine._batch.n]].index(job)
    assert engine._batch.due_host[row] == pytest.approx(job.due)


def test_admission_predicts_with_the_expected_time_the_scheduler_plans_with_the_margin() -> None:
    engine = _engine_with_work()
    engine.answer_time.margin_s = 0.3  # a margin (the network) that only the plan keeps
    job = engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.7))  # 0.6 s: accepted
    assert job.due == pytest.approx(job.created + 0.7 - 0.3)  # planned 0.3 s early


def test_the_deadline_counts_from_arrival() -> None:
    engine = _engine_with_work()
    late = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=1.0, created=time.monotonic() - 0.5)
    with pytest.raises(DeadlineUnmeetable):  # 0.5 s already spent reading it: 0.6 s more misses 1.0 s
        engine.submit(late)
    engine.submit(Job(ImageRequest(3, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=1.0))  # just arrived: fits


def test_the_server_measures_its_answers_streams_too_and_reports_the_reserve(model_dir) -> None:  # type: ignore[no-untyped-def]
    with app_client(model_dir) as c:
        wait_ready(c)
        answer = c.app.state.server.engine.answer_time  # type: ignore[attr-defined]
        assert metric(c, "ddpm_answer_reserve_seconds") == pytest.approx(0.005)  # DDPM_DEADLINE_MARGIN_S alone
        assert c.post("/generate", json={"seed": 1, "steps": 2}).status_code == 200
        assert answer.samples == 0  # only answers with a deadline are measured
        assert c.post("/generate", json={"seed": 2, "steps": 2, "deadline_s": 60}).status_code == 200
        assert c.post("/v1/images/generations", json={"prompt": "x", "seed": 3, "steps": 2, "deadline_s": 60}).status_code == 200
        assert c.post("/generate/stream", json={"seed": 4, "steps": 2, "deadline_s": 60}).status_code == 200
        assert answer.samples == 3 and answer.mean is not None and 0 < answer.mean < 5
        assert metric(c, "ddpm_answer_reserve_seconds") == pytest.approx(answer.reserve_s) and answer.reserve_s > 0.005
