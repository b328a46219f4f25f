"""Step-level scheduling (issue 37): priorities and deadlines decide which resident rows advance, a row of a
worse priority sits iterations out with its state kept and its image unchanged, nobody starves, a deadline
that cannot be met is refused at once, and a request's cost is bounded on arrival.

The engine tests drive ``Engine._iterate`` by hand (no thread) with a fake clock and a set cost model:
deterministic, counted in iterations, not wall time."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.engine.engine import Engine
from service.engine.errors import DeadlineUnmeetable
from service.engine.iteration_cost import IterationCost
from service.engine.job import Job
from service.engine.observer import EngineObserver
from service.engine.step_scheduler import SAFETY, choose, slowdown_limit
from tests.app_client import app_client, metric, wait_ready
from tests.batch_rounding import BATCH_ROUNDING
from tests.tiny_model import TINY_CLASSES, random_tiny_conditional_unet, random_tiny_unet, tiny_loaded_model


class FakeClock:
    """The scheduler's now, moved by the test (it starts at the real monotonic time: deadlines count from a
    job's real arrival)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def _engine(max_batch: int = 2, max_resident: int = 6, **kwargs: object) -> tuple[Engine, torch.nn.Module]:
    unet = random_tiny_unet()
    return Engine(tiny_loaded_model(unet), max_batch=max_batch, max_resident=max_resident, **kwargs), unet  # type: ignore[arg-type]


def _conditional_engine(**kwargs: object) -> Engine:
    """An engine on the tiny class-conditional model (its guided rows take two U-Net rows)."""
    model = tiny_loaded_model(random_tiny_conditional_unet())
    model.num_classes = len(TINY_CLASSES)
    return Engine(model, **kwargs)  # type: ignore[arg-type]


def _set_cost(seconds: dict[int, float]) -> IterationCost:
    """A set cost model: these seconds per iteration of so many rows, which the engine's measurements do not
    change (they move a size's average by ``alpha`` = 0)."""
    cost = IterationCost()
    for rows, s in seconds.items():
        cost.observe(rows, s)
    cost.alpha = 0.0
    return cost


def _offline(unet: torch.nn.Module, job: Job) -> torch.Tensor:
    spec = job.chain
    with torch.inference_mode():
        return sample(unet, tiny_loaded_model(unet).schedule, seeds_to_tensor(image_seeds(job.seed, job.n)), (1, 8, 8), steps=spec.steps,
                      sampler=spec.sampler, spacing=spec.spacing, clip_denoised=spec.clip)  # fmt: skip


def test_a_better_priority_takes_the_rows_and_the_preempted_images_do_not_change() -> None:
    engine, unet = _engine(max_batch=2, max_resident=6)
    bulk = engine.submit(Job(ImageRequest(1, 2, ChainSpec(30, "ddpm")), timeout_s=600, priority=5))
    for _ in range(5):
        engine._iterate()
    assert bulk.steps_done == 10  # both rows, every iteration
    urgent = engine.submit(Job(ImageRequest(2, 2, ChainSpec(8, "ddim", spacing="trailing")), timeout_s=600, priority=0))
    before = bulk.steps_done
    iterations = 0
    while not urgent.done:
        engine._iterate()
        iterations += 1
    assert iterations == 8  # the urgent request ran every iteration: as fast as alone
    assert bulk.steps_done == before  # the bulk rows sat every one of them out (2 rows per call, both urgent)
    while not bulk.done:
        engine._iterate()
    for job in (bulk, urgent):
        assert job.error is None
        offline = _offline(unet, job)
        assert (job.images - offline).abs().max().item() < BATCH_ROUNDING  # type: ignore[operator]


def test_a_job_a_more_urgent_request_shares_runs_at_its_priority_from_then_on() -> None:
    """Priority inheritance: a priority-0 request identical to a running priority-5 job shares it (service/api/in_flight.py)
    and ``Engine.promote`` raises the job to 0: its resident rows take the rows from a priority-3 job at the next
    iteration, and its images are those of its seed all the same. A done or cancelled job is not promoted."""
    engine, unet = _engine(max_batch=2, max_resident=6)
    bulk = engine.submit(Job(ImageRequest(1, 2, ChainSpec(30, "ddpm")), timeout_s=600, priority=5))
    for _ in range(3):
        engine._iterate()
    other = engine.submit(Job(ImageRequest(2, 2, ChainSpec(20, "ddim", spacing="trailing")), timeout_s=600, priority=3))
    for _ in range(3):
        engine._iterate()
    assert bulk.steps_done == 6 and other.steps_done == 6  # priority 3 took both rows of each call
    assert engine.promote(bulk, 0) and bulk.priority == 0
    assert engine.promote(bulk, 4) and bulk.priority == 0  # a less urgent sharer leaves it as it is
    for _ in range(4):
        engine._iterate()
    assert bulk.steps_done == 6 + 8 and other.steps_done == 6  # now the bulk job's rows go first
    while not (bulk.done and other.done):
        engine._iterate()
    for job in (bulk, other):
        assert job.error is None and (job.images - _offline(unet, job)).abs().max().item() < BATCH_ROUNDING  # type: ignore[operator]
    assert not engine.promote(bulk, 0)  # done: the request needs a job of its own
    cancelled = engine.submit(Job(ImageRequest(3, 1, ChainSpec(5, "ddim")), timeout_s=600, priority=5))
    cancelled.cancel()
    assert not engine.promote(cancelled, 0)


def test_a_waiting_job_promoted_waits_at_its_new_priority_with_its_images_still_to_admit() -> None:
    from service.engine.request_queue import create_request_queue

    queue = create_request_queue("continuous")
    jobs = [Job(ImageRequest(seed, 3, ChainSpec(5, "ddim")), timeout_s=600, priority=priority) for seed, priority in ((1, 3), (2, 5))]
    for job in jobs:
        queue.add(job)
    assert [(job.seed, k) for job, k in queue.take(4)] == [(1, 0), (1, 1), (1, 2), (2, 0)]  # priority 3 first
    queue.add(third := Job(ImageRequest(3, 2, ChainSpec(5, "ddim")), timeout_s=600, priority=1))
    queue.move(jobs[1], 0)  # two of its images still wait
    assert queue.images == 4 and queue.images_ahead(third) == 2 and queue.calls_at_or_above(0)[0] == 2
    assert [(job.seed, k) for job, k in queue.take(4)] == [(2, 1), (2, 2), (3, 0), (3, 1)] and queue.images == 0
    queue.move(jobs[0], 0)  # nothing of it waits: only its priority changes
    assert jobs[0].priority == 0 and not queue


def test_at_one_priority_a_short_request_beside_a_full_batch_runs_every_iteration() -> None:
    engine, _ = _engine(max_batch=2, max_resident=4)
    long = engine.submit(Job(ImageRequest(1, 2, ChainSpec(200, "ddpm")), timeout_s=600))
    engine._iterate()
    short = engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=600))
    iterations = 0
    while not short.done:
        engine._iterate()
        iterations += 1
    assert iterations == 10 and long.steps_done == 2 + 10  # the long request kept one row of two going
    assert short.error is None


class _CallSizes(EngineObserver):
    """The rows of every iteration's U-Net call, in order."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_iteration(self, batch_size: int, seconds: float) -> None:
        self.sizes.append(batch_size)


def test_a_closed_loop_of_requests_keeps_every_call_full() -> None:
    """Three 4-image requests (12 rows) beside calls of 8, each finished request replaced at once, as a client
    that sends its next request when the last one is answered. A request is done when its last row is: ranked
    row by row, rows sitting out drifted behind the rest of their request, every request then waited for a few
    laggards, and 124 of 300 calls ran short (1,904 rows instead of 2,400, 21 requests instead of 29)."""
    sizes = _CallSizes()
    engine, _ = _engine(max_batch=8, max_resident=20, tune_call_size=False, observer=sizes)
    seeds, chain = iter(range(1000)), ChainSpec(20, "ddim", spacing="trailing")
    flight = [engine.submit(Job(ImageRequest(next(seeds), 4, chain), timeout_s=600)) for _ in range(3)]
    answered = 0
    for _ in range(300):
        engine._iterate()
        answered += sum(job.done for job in flight)
        flight = [job if not job.done else engine.submit(Job(ImageRequest(next(seeds), 4, chain), timeout_s=600)) for job in flight]
    assert sizes.sizes == [8] * 300
    assert answered == 29  # 300 x 8 rows / 80 a request, less the first requests' start


def test_a_request_s_rows_run_together_its_slowest_first() -> None:
    """Ranked by the request's steps left (its slowest row's), then the request: a call of 4 takes two whole
    requests, the laggard of the first one first. Row by row, the three one step ahead would have gone first,
    splitting the second and third requests."""
    remaining = np.array([10, 9, 9, 10, 9, 10])
    job = np.array([1, 1, 2, 2, 3, 3])
    args = (6, 4, np.zeros(6, dtype=np.int64), np.full(6, np.inf), remaining, np.zeros(6, dtype=np.int64), 0.0, _set_cost({1: 0.1}))
    choice = choose(*args, job=job)
    assert choice is not None and choice.count == 4
    assert choice.rows[:4].tolist() == [0, 1, 3, 2]
    row_by_row = choose(*args)  # each row its own request: the fewer steps left first
    assert row_by_row is not None and sorted(row_by_row.rows[:4].tolist()) == [0, 1, 2, 4]


def test_no_row_waits_more_than_starve_after_iterations() -> None:
    engine, _ = _engine(max_batch=2, max_resident=4, starve_after=3)
    bulk = engine.submit(Job(ImageRequest(1, 1, ChainSpec(200, "ddpm")), timeout_s=600, priority=9))
    engine._iterate()
    engine.submit(Job(ImageRequest(2, 3, ChainSpec(200, "ddpm")), timeout_s=600, priority=0))  # always more urgent rows than room
    waits, last, sat = [], bulk.steps_done, 0
    for _ in range(40):
        engine._iterate()
        if bulk.steps_done == last:
            sat += 1
        else:
            waits.append(sat)
            sat, last = 0, bulk.steps_done
    assert waits and max(waits) <= 3  # it advanced at least once every 4 iterations, whatever its priority


def test_the_row_with_less_slack_goes_first_and_fewer_rows_run_for_a_tight_deadline() -> None:
    clock = FakeClock()
    engine, _ = _engine(max_batch=4, max_resident=8, clock=clock)
    relaxed = engine.submit(Job(ImageRequest(1, 3, ChainSpec(50, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = _set_cost({1: 0.1, 2: 0.2, 4: 1.0})  # 4 rows cost 10x one
    tight = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=600, deadline_s=1.5)
    engine._admission_control = lambda job: None  # type: ignore[method-assign]  # this test is the scheduler's, not admission's
    clock.now = tight.created
    engine.submit(tight)
    advanced = []
    while not tight.done:  # the fake clock moves by what the cost model says each iteration cost
        before = (relaxed.steps_done, tight.steps_done)
        engine._iterate()
        step = (relaxed.steps_done - before[0], tight.steps_done - before[1])
        advanced.append(step)
        clock.now += engine.cost.seconds(sum(step)) or 0.0
    # 10 steps in 1.5 s: 0.15 s an iteration at first, so 1 row a call (0.1 s), not 4 (1.0 s): the tight row alone;
    # once it is ahead of its schedule, as many rows as still let it finish in time join it
    assert all(t == 1 for _, t in advanced), advanced
    assert advanced[:3] == [(0, 1)] * 3 and sum(r for r, _ in advanced) > 0, advanced
    assert clock.now <= tight.due + 1e-9, str(advanced)  # type: ignore[operator]
    assert tight.done and tight.error is None


def test_a_deadline_that_cannot_be_met_is_refused_at_once_with_the_predicted_wait() -> None:
    engine, _ = _engine(max_batch=2, max_resident=2)
    engine.submit(Job(ImageRequest(1, 2, ChainSpec(100, "ddpm")), timeout_s=600, deadline_s=600))
    engine._iterate()
    engine.cost = IterationCost()  # a set cost model: 0.05 s a row
    for rows in (1, 2):
        engine.cost.observe(rows, 0.05 * rows)
    engine._iteration_ends = time.monotonic() + 0.1  # an iteration of 0.1 s in flight
    assert engine.predicted_seconds(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60)) == pytest.approx(
        0.1 + (99 * 2 + 10) / 2 * 0.1, rel=0.05
    )  # the iteration in flight, then the batch's 198 row-steps ahead and its own 10, two rows a call at 0.1 s
    with pytest.raises(DeadlineUnmeetable, match="with the work ahead of it") as refused:
        engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=2.0))
    assert refused.value.retry_after_s == pytest.approx(0.1 + 10.4 - 2.0, rel=0.05)
    # a deadline under what the request takes alone (10 calls of 0.05 s): no wait here helps, and the refusal says so
    with pytest.raises(DeadlineUnmeetable, match=r"even alone on this replica it would take ~0\.50 s \(10 U-Net calls\)") as alone:
        engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.3, priority=-1))
    assert alone.value.retry_after_s == 1.0  # not the 0.2 s it misses by, nor the work ahead: no wait here helps
    # a worse priority's work does not count: a more urgent request is accepted
    engine.submit(Job(ImageRequest(3, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=2.0, priority=-1))


def test_a_refused_deadline_does_not_shorten_the_iterations() -> None:
    """Only an accepted request's deadline shapes the iterations (step_scheduler.iteration_limit): a request refused for a
    deadline nobody could meet (``deadline_s`` 0.001, which anyone may send) must not shrink every call to one row
    for the next minute."""
    engine, _ = _engine(max_batch=4, max_resident=8)
    engine.submit(Job(ImageRequest(1, 4, ChainSpec(50, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = _set_cost({1: 0.05, 2: 0.1, 4: 0.2})
    with pytest.raises(DeadlineUnmeetable):
        engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=0.001))
    assert engine._schedule(engine._batch) == 4  # the full call, as before it came


def _bulk_engine_beside(deadline_s: float, calls: int) -> int:
    """Rows the next iteration runs of a batch of 8 bulk rows (no deadline; calls of 8 at 0.01 s a row) once a
    1-image request of ``calls`` calls with ``deadline_s`` has been accepted (it waits in the queue)."""
    engine, _ = _engine(max_batch=8, max_resident=16)
    engine.submit(Job(ImageRequest(1, 8, ChainSpec(50, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = _set_cost({1: 0.01, 2: 0.02, 4: 0.04, 8: 0.08})
    engine._iteration_ends = time.monotonic()  # nothing in flight
    engine.submit(Job(ImageRequest(2, 1, ChainSpec(calls, "ddpm")), timeout_s=60, deadline_s=deadline_s))  # accepted
    return engine._schedule(engine._batch)


def test_while_deadlines_arrive_calls_stay_short_but_never_below_a_quarter_of_the_call_size() -> None:
    """While requests with deadlines arrive an iteration is kept short, since a newcomer first waits for the one in
    flight: a fifth of the tightest accepted deadline, and never shorter than an iteration of a quarter of the call
    size (one request's tight deadline, which anyone may send, cannot make every call one row)."""
    assert _bulk_engine_beside(1.0, 10) == 8  # 0.2 s: the full call of 8 (0.08 s)
    assert _bulk_engine_beside(0.3, 10) == 6  # 0.06 s: 6 rows
    assert _bulk_engine_beside(0.03, 1) == 2  # 0.006 s is less than one row costs: calls of 2, a quarter of 8


def test_work_without_a_deadline_does_not_count_against_one() -> None:
    """Rows with a deadline go first (step_scheduler.py): a batch full of work without one leaves a deadline
    the iteration in flight and its own calls."""
    engine, _ = _engine(max_batch=2, max_resident=4)
    engine.submit(Job(ImageRequest(1, 2, ChainSpec(100, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = IterationCost()
    for rows in (1, 2):
        engine.cost.observe(rows, 0.05 * rows)
    engine._iteration_ends = time.monotonic() + 0.1
    job = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=2.0)
    assert engine.predicted_seconds(job) == pytest.approx(0.1 + 10 * 0.05, rel=0.05)
    engine.submit(job)  # accepted


@pytest.fixture(scope="module")
def sched_client(model_dir):  # type: ignore[no-untyped-def]
    with app_client(model_dir, max_calls_per_request=200, max_calls_per_client=250, max_images_per_request=8) as c:
        yield wait_ready(c)


def test_the_answer_echoes_the_priority_within_the_bounds(sched_client: TestClient) -> None:
    r = sched_client.post("/generate", json={"seed": 1, "steps": 3, "priority": -1000000, "deadline_s": 60})
    assert r.status_code == 200, r.text
    assert (r.json()["priority"], r.json()["deadline_s"]) == (0, 60)  # an open server: nobody below 0
    r = sched_client.post("/v1/images/generations", json={"prompt": "x", "seed": 1, "steps": 3, "priority": 99})
    assert r.status_code == 200 and r.json()["priority"] == 10  # DDPM_MAX_PRIORITY


def test_a_request_over_the_call_bound_is_422_naming_its_cost(sched_client: TestClient) -> None:
    before = metric(sched_client, 'ddpm_refused_requests_total{reason="cost"}')
    r = sched_client.post("/generate", json={"seed": 1, "batch_size": 8, "steps": 30})
    assert r.status_code == 422 and "costs 240 U-Net row-calls" in r.json()["detail"] and "the bound is 200" in r.json()["detail"]
    assert metric(sched_client, 'ddpm_refused_requests_total{reason="cost"}') == before + 1


def test_a_request_no_idle_server_could_admit_is_422_not_a_retry_for_ever(model_dir) -> None:  # type: ignore[no-untyped-def]
    """Within DDPM_MAX_IMAGES_PER_REQUEST and DDPM_MAX_CALLS_PER_REQUEST, a request over the queue or a client's quota
    was 503 or 429 with Retry-After: a client (ours, OpenAI's) retried what could never run."""
    bounds = {"max_images_per_request": 8, "max_queue": 6, "max_images_per_client": 4, "max_calls_per_request": 1000,
              "max_calls_per_client": 30}  # fmt: skip
    with app_client(model_dir, **bounds) as c:
        wait_ready(c)
        for body, said in (({"batch_size": 7, "steps": 2}, "asks for 7 images, and the queue holds at most 6 (DDPM_MAX_QUEUE)"),
                           ({"batch_size": 5, "steps": 2}, "asks for 5 images, and a client may have in flight at most 4 "
                            "(DDPM_MAX_IMAGES_PER_CLIENT)"),
                           ({"batch_size": 4, "steps": 10}, "asks for 40 U-Net row-calls, and a client may have in flight at most 30 "
                            "(DDPM_MAX_CALLS_PER_CLIENT)")):  # fmt: skip
            r = c.post("/generate", json={"seed": 1, "sampler": "ddim", **body})
            assert r.status_code == 422 and "retry-after" not in r.headers and said in r.json()["detail"], r.text
        assert metric(c, 'ddpm_refused_requests_total{reason="size"}') == 3
        assert c.post("/generate", json={"seed": 1, "sampler": "ddim", "batch_size": 3, "steps": 10}).status_code == 200  # 30 calls


def test_a_refused_deadline_carries_retry_after(model_dir) -> None:  # type: ignore[no-untyped-def]
    with app_client(model_dir, max_batch=1, max_resident=1) as c:
        wait_ready(c)
        state = c.app.state.server  # type: ignore[attr-defined]
        state.engine.cost = IterationCost()
        state.engine.cost.observe(1, 1.0)  # one second an iteration: a 20-step chain cannot make 2 s
        r = c.post("/generate", json={"seed": 1, "steps": 20, "sampler": "ddim", "deadline_s": 2})
        # it alone takes ~20 s here: no wait helps, so not "retry in 18 s" (which a client honouring it would wait out in vain)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "even alone on this replica it would take ~20" in r.text
        assert metric(c, 'ddpm_refused_requests_total{reason="deadline"}') == 1
        assert metric(c, 'ddpm_refused_requests_total{reason="accepted_deadlines"}') == 0  # exported from the start


def test_a_request_that_alone_outlasts_the_request_timeout_is_refused_at_once(model_dir) -> None:  # type: ignore[no-untyped-def]
    """Without a deadline too: alone it would end 504 after holding rows for all of DDPM_REQUEST_TIMEOUT_S (and the openai
    client would send it twice more); what fits is accepted as before."""
    with app_client(model_dir, max_batch=1, max_resident=1, request_timeout_s=5) as c:
        wait_ready(c)
        state = c.app.state.server  # type: ignore[attr-defined]
        state.engine.cost = IterationCost()
        state.engine.cost.observe(1, 0.5)  # half a second an iteration: 20 steps take ~10 s, 4 steps ~2 s
        r = c.post("/generate", json={"seed": 1, "steps": 20, "sampler": "ddim"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "longer than the request timeout of 5 s (DDPM_REQUEST_TIMEOUT_S)" in r.json()["detail"]
        assert metric(c, 'ddpm_refused_requests_total{reason="timeout"}') == 1
        assert metric(c, 'ddpm_refused_requests_total{reason="deadline"}') == 0
        assert c.post("/generate", json={"seed": 1, "steps": 4, "sampler": "ddim"}).status_code == 200


@pytest.mark.parametrize("max_slowdown", [10.0, 0.0])
def test_a_short_request_beside_a_long_one_takes_at_most_its_slowdown_bound(max_slowdown: float) -> None:
    """Without a deadline, a 10-call request beside a full batch of a long chain finishes within 10x its time
    alone (the iterations shortened for it, fewer of the long chain's rows running), counted on a fake clock
    that moves by the cost model; with the bound off (0) it runs beside the full batch and takes longer."""
    clock = FakeClock()
    engine, _ = _engine(max_batch=4, max_resident=8, clock=clock, max_slowdown=max_slowdown)
    long = engine.submit(Job(ImageRequest(1, 4, ChainSpec(200, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = _set_cost({1: 0.1, 4: 1.0})  # 1 row 0.1 s, 4 rows 1.0 s (linear between)
    short = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=600)
    clock.now = short.created
    engine.submit(short)
    alone, long_before = 10 * 0.1, long.steps_done
    rows = []
    while not short.done:
        before = long.steps_done + short.steps_done
        engine._iterate()
        rows.append(long.steps_done + short.steps_done - before)
        clock.now += engine.cost.seconds(rows[-1]) or 0.0
    took = clock.now - short.created
    if max_slowdown:
        # 0.7 s iterations at first (SAFETY of 10 s / 10 calls): 3 rows, not 4; more once it is ahead of its bound
        assert took <= 10 * alone * 0.71 + 1e-9 and rows[0] == 3, (took, rows)
    else:
        assert took == pytest.approx(10 * 1.0) and set(rows) == {4}, (took, rows)  # beside the full batch: 10x
    assert long.steps_done - long_before == sum(rows) - 10  # the long chain advanced in every iteration beside it


def test_a_slowdown_target_that_only_shorter_iterations_could_meet_binds_nothing() -> None:
    """A no-deadline job whose bounded-slowdown target can no longer be met at the pace it was set at (its rows'
    own iteration cost) does not shrink the iterations: the full batch runs. Before this rule, every target
    shrank them in the seconds before it passed: at 1.5x load a sixth of the iterations ran 1 row of ~190."""
    clock = FakeClock()
    engine, _ = _engine(max_batch=4, max_resident=8, clock=clock)
    long = engine.submit(Job(ImageRequest(1, 4, ChainSpec(200, "ddpm")), timeout_s=600))
    engine._iterate()
    engine.cost = _set_cost({1: 0.1, 4: 1.0})
    short = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=600)
    clock.now = short.created
    engine.submit(short)
    assert short.soft_due == pytest.approx(short.created + 10 * 10 * 0.1) and short.soft_step_s == pytest.approx(0.1)
    clock.now = short.soft_due - 1.2  # 0.12 s a call left: 0.084 at SAFETY, under the 0.1 s of its own pace
    before = long.steps_done + short.steps_done
    engine._iterate()
    assert long.steps_done + short.steps_done - before == 4  # the full batch (the target as it was shrank it to 1)
    clock.now = short.created + 0.5  # 9.5 s for 9 calls: met at its pace, so it binds (0.74 s: 3 rows, not 4)
    before = long.steps_done + short.steps_done
    engine._iterate()
    assert long.steps_done + short.steps_done - before == 3


def test_a_slowdown_target_binds_at_its_own_rows_pace() -> None:
    """The pace is the job's own rows' iteration: a 16-image job's target binds while 16-row iterations can
    meet it, and once only shorter ones could, it binds nothing (instead of shrinking every call to 1 row)."""
    now, remaining, priority = 100.0, np.array([50, 50, 10]), np.array([5, 5, 5])
    soft_step = np.array([0.05, 0.05, 0.0])  # two rows of a 16-image job whose rows' iteration costs 50 ms; no target
    soft_due = np.array([now + 50 * 0.08, now + 50 * 0.08, np.inf])  # 80 ms a call left: 56 ms at SAFETY
    assert slowdown_limit(soft_due, soft_step, priority, remaining, now) == pytest.approx(SAFETY * 0.08)
    soft_due[:2] = now + 50 * 0.06  # 60 ms a call left: 42 ms at SAFETY, under its 50 ms pace
    assert slowdown_limit(soft_due, soft_step, priority, remaining, now) is None
    soft_due[:2] = now - 1.0  # passed
    assert slowdown_limit(soft_due, soft_step, priority, remaining, now) is None


def test_a_request_whose_images_fill_the_batch_leaves_rows_for_the_next() -> None:
    """One request of more images than the running batch holds (issue 37's reproduction, from one client):
    the last max_batch resident rows are kept for newcomers, so a 1-image request joins at once and
    finishes in about its own chain's iterations, not after the big one's chains end."""
    engine, _ = _engine(max_batch=2, max_resident=6, max_slowdown=0.0)
    big = engine.submit(Job(ImageRequest(1, 16, ChainSpec(100, "ddpm")), timeout_s=600))
    for _ in range(3):
        engine._iterate()
    assert engine._batch.n == 4  # 6 rows less the 2 kept for newcomers
    small = engine.submit(Job(ImageRequest(2, 1, ChainSpec(5, "ddpm")), timeout_s=600))
    iterations = 0
    while not small.done:
        engine._iterate()
        iterations += 1
    assert iterations <= 6 and small.error is None, iterations  # its 5 steps (shortest first), not ~400 iterations
    assert big.steps_done > 0 and not big.done


def test_the_cost_of_many_sizes_at_once_is_each_size_s_own() -> None:
    """``seconds_of`` (the scheduler's searches for the largest count within a time) predicts what ``seconds`` does
    for each size: exact at a measured size, interpolated between, the smallest's below, extrapolated beyond, and it
    follows the measurements as they move."""
    cost = IterationCost()
    assert cost.seconds_of(np.arange(1, 4)) is None
    for rows, seconds in {2: 0.02, 4: 0.05, 8: 0.07}.items():
        cost.observe(rows, seconds)
    cost.observe(4, 0.08)  # a measured size's figure moves
    rows = np.arange(0, 14)
    many = cost.seconds_of(rows)
    assert many is not None
    assert many.tolist() == pytest.approx([cost.seconds(int(r)) for r in rows], rel=1e-12)
    assert many[[2, 4, 8]].tolist() == [cost.seconds(2), cost.seconds(4), cost.seconds(8)]  # exact where measured
    assert many[0] == 0.0 and many[1] == cost.seconds(2) and many[6] == pytest.approx((cost.seconds(4) + 0.07) / 2)
    assert many[13] > many[8]  # beyond the largest size: extrapolated upwards


def test_a_guided_row_costs_its_two_unet_rows() -> None:
    """A guided image takes two U-Net rows a call (its null-label row beside it): the cost model learns an
    iteration by the call's rows, and admission control and the scheduler predict with them."""
    engine = _conditional_engine(max_batch=4, max_resident=8)
    engine.submit(Job(ImageRequest(1, 2, ChainSpec(10, "ddpm"), (0, 1), 2.0), timeout_s=60))  # 2 guided images, no deadline
    engine._iterate()
    assert engine.cost._sizes == [4]  # a call of 4 rows, not 2
    engine.cost = _set_cost({1: 0.1, 2: 0.2, 4: 0.4})
    engine._iteration_ends = time.monotonic()  # nothing in flight
    guided = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm"), (1,), 2.0), timeout_s=60, deadline_s=60)
    plain = Job(ImageRequest(3, 1, ChainSpec(10, "ddpm"), (1,), 0.0), timeout_s=60, deadline_s=60)
    assert engine.predicted_seconds(guided) == pytest.approx(10 * 0.2, abs=0.01)  # 2 rows a call
    assert engine.predicted_seconds(plain) == pytest.approx(10 * 0.1, abs=0.01)
    # the scheduler: a guided row with a deadline that allows 0.3 s an iteration runs beside one more row, not two
    now, cost = time.monotonic(), _set_cost({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5})
    due = np.array([now + 10 * 0.3 / SAFETY + 1e-6, np.inf, np.inf, np.inf])
    args = (4, 4, np.zeros(4, dtype=np.int64), due, np.array([10, 50, 50, 50]), np.zeros(4, dtype=np.int64), now, cost)
    as_rows = choose(*args, unet_rows=np.array([2, 1, 1, 1]))
    as_samples = choose(*args)
    assert as_rows is not None and as_rows.count == 2 and as_rows.rows[0] == 0  # 3 U-Net rows: 0.3 s
    assert as_samples is not None and as_samples.count == 3


def test_admission_counts_the_rows_ahead_only_while_their_chains_run() -> None:
    """A request with a deadline runs beside the rows ahead of it only until their chains end: its predicted
    time is each iteration at the rows still there, not every iteration at all of them (which refused requests
    the scheduler would have answered in time)."""
    engine, _ = _engine(max_batch=4, max_resident=8, tune_call_size=False)
    engine.submit(Job(ImageRequest(1, 1, ChainSpec(10, "ddpm")), timeout_s=600, deadline_s=600))
    for _ in range(8):
        engine._iterate()
    assert int(engine._batch.pos_host[0]) + 1 == 2  # 2 iterations left
    engine.cost = _set_cost({1: 0.1, 2: 0.3})
    engine._iteration_ends = time.monotonic()  # nothing in flight
    new = Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=60)
    assert engine.predicted_seconds(new) == pytest.approx(2 * 0.3 + 8 * 0.1, abs=0.01)  # not 10 x 0.3
    left, rows = np.array([3, 5, 5]), np.array([1, 2, 1])  # the cost model's sum, against the formula
    assert engine.cost.chain_seconds(1, 7, left, rows) == pytest.approx(3 * engine.cost.seconds(5) + 2 * engine.cost.seconds(4) + 2 * 0.1)  # type: ignore[operator]


class _Refusals(EngineObserver):
    """The reasons the engine refused requests for, in order."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def on_refused(self, reason: str) -> None:
        self.reasons.append(reason)


def test_a_request_that_would_make_an_accepted_one_late_is_refused() -> None:
    """Every row with a deadline runs every iteration, so a newcomer slows those already accepted: one whose own
    deadline is easy is refused when beside them it would push one past its plan."""
    refusals = _Refusals()
    engine, _ = _engine(max_batch=4, max_resident=8, tune_call_size=False, observer=refusals)
    engine.submit(Job(ImageRequest(1, 1, ChainSpec(10, "ddpm")), timeout_s=600, deadline_s=600))
    engine._iterate()  # resident, 9 iterations left
    engine.cost = _set_cost({1: 0.1, 2: 0.3})
    now = time.monotonic()
    engine._iteration_ends = now  # nothing in flight
    engine._batch.due_host[0] = now + 9 * 0.1 + 0.5  # alone it is done 0.5 s early; beside another row, 1.3 s late
    with pytest.raises(DeadlineUnmeetable, match="make one of them late") as refused:
        engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=60))  # its own: 2.8 s of 60
    assert refused.value.retry_after_s == pytest.approx(1.0)  # the running rows are done in 0.9 s (at least 1 s)
    assert refusals.reasons == ["accepted_deadlines"]  # counted apart from a deadline of its own that cannot be met
    engine._batch.due_host[0] = now + 9 * 0.3 - 0.2  # beside it 0.2 s late: within one iteration (0.3 s), the bound
    engine.submit(Job(ImageRequest(3, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=60))


def test_a_request_that_would_make_a_waiting_one_late_is_refused() -> None:
    """Requests that arrive during one iteration all wait for it: the first ones, still in the queue, are slowed by
    the last as much as resident rows are (in the simulator, the late answers of bursts)."""
    engine, _ = _engine(max_batch=4, max_resident=8, tune_call_size=False)
    engine.cost = _set_cost({1: 0.1, 2: 0.3})
    first = engine.submit(Job(ImageRequest(1, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=1.5))  # 1.0 s alone
    with pytest.raises(DeadlineUnmeetable, match="make one of them late"):  # beside it 3.0 s: past 1.5 s by 5 iterations
        engine.submit(Job(ImageRequest(2, 1, ChainSpec(10, "ddpm")), timeout_s=60, deadline_s=60))
    assert first.first_admitted is None  # it was waiting
