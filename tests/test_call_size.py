"""The call size (service/engine/call_size.py): how many rows one U-Net call takes while more are resident,
learned from the measured cost curve, on curves measured on real machines and on the engine without HTTP."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from service.engine.call_size import EXPLORE_EVERY, CallSize
from service.engine.iteration_cost import IterationCost
from service.engine.job import Job
from tests.app_client import app_and_state, metric, wait_ready
from tests.batch_rounding import BATCH_ROUNDING
from tests.test_scheduling import _conditional_engine, _engine, _offline, _set_cost

# ms of one U-Net call per rows: the shipped model compiled (bf16, 1 thread) on a 2-core AVX-512 EPYC, 2026-12-04
# (its rate peaks at 24-32 rows: 349 rows/s against 282 at 64), and on an H200 (BENCHMARKS "GPU": CUDA graphs)
CPU_MS = {1: 7.2, 8: 25.4, 16: 46.8, 24: 68.7, 32: 91.7, 48: 151.5, 64: 226.7}
H200_MS = {1: 0.429, 16: 0.676, 64: 0.935}


def _curve(ms: dict[int, float]) -> IterationCost:
    cost = IterationCost()
    for rows, t in ms.items():
        cost.observe(rows, t / 1e3)
    return cost


def test_the_best_rate_is_a_measured_size_and_beats_the_full_batch_by_the_margin() -> None:
    assert _curve(CPU_MS).best_rate_rows(64, 0.05) == 24  # 349.3 rows/s (32: 349.0; 64: 282)
    assert _curve(CPU_MS).best_rate_rows(16, 0.05) == 16  # up to the limit only
    assert _curve(H200_MS).best_rate_rows(64, 0.05) == 64  # a GPU: the full batch
    near = _curve({48: 48 / 300 * 1e3, 64: 64 / 290 * 1e3})  # 48 rows 3.4% better than 64: within the margin, noise
    assert near.best_rate_rows(64, 0.05) == 64
    assert IterationCost().best_rate_rows(64, 0.05) == 64  # nothing measured
    assert _curve({1: 7.2, 2: 9.0}).best_rate_rows(64, 0.05) == 64  # 64 not run yet: predicted (extrapolated) faster


def test_a_sizes_first_iterations_are_averaged_so_a_cold_first_one_does_not_linger() -> None:
    cost = IterationCost(alpha=0.1)
    cost.observe(64, 30.0)  # e.g. the first call at a size: allocation, one-time set-up
    for _ in range(9):
        cost.observe(64, 0.2)
    assert cost.seconds(64) == pytest.approx((30.0 + 9 * 0.2) / 10)  # their mean (a plain EMA: 11.7 s)
    cost.observe(64, 0.2)  # from the 1/alpha-th on, the moving average
    assert cost.seconds(64) == pytest.approx(3.18 + 0.1 * (0.2 - 3.18))


def _run(call: CallSize, truth: dict[int, float], iterations: int, resident: int = 256) -> list[int]:
    """``iterations`` iterations with ``resident`` rows, each measured at the true curve (linear between)."""
    sizes, ms = zip(*sorted(truth.items()), strict=True)
    cost, rows = _curve({1: truth[1], 2: float(np.interp(2, sizes, ms)), 64: truth[64]}), []  # the warm-up's sizes
    for _ in range(iterations):
        rows.append(call.rows(resident, cost))
        cost.observe(rows[-1], float(np.interp(rows[-1], sizes, ms)) / 1e3)
    return rows


def test_on_a_cpu_curve_it_climbs_to_the_peak_from_the_warm_up_sizes() -> None:
    """From the sizes the warm-up runs (1, 2, 64), exploring the grid's neighbours finds the 24-32 row peak."""
    call = CallSize(64)
    rows = _run(call, CPU_MS, 40 * EXPLORE_EVERY)
    assert rows[0] == 64 and call.best in (24, 32), rows[:: EXPLORE_EVERY // 2]
    sizes, ms = zip(*sorted(CPU_MS.items()), strict=True)
    tail = rows[len(rows) // 2 :]  # the rate it serves at once settled, exploring included
    rate = sum(tail) / sum(float(np.interp(r, sizes, ms)) / 1e3 for r in tail)
    assert rate >= 0.98 * 349 and rate > 1.2 * 282, rate  # the peak's rate, not the full batch's


def test_it_climbs_past_a_plateau() -> None:
    """The same model on the same kind of machine, another day (``benchmarks/unet_cost_curve.py``, 2026-12-04): 330
    rows/s at 64 rows and 328 at 48, then 382 at 32. The climb tries the size past a neighbour within the margin;
    stopping at 48, a closed loop of bulk requests ran at 64 rows (call_size_ab.py --engine: 339 rows/s against 387)."""
    plateau = {1: 7.2, 8: 25.4, 16: 42.8, 24: 62.8, 32: 83.9, 48: 146.2, 64: 194.1}
    call = CallSize(64)
    rows = _run(call, plateau, 20 * EXPLORE_EVERY)
    assert call.best in (24, 32), rows[EXPLORE_EVERY - 1 :: EXPLORE_EVERY]
    tail = rows[-2 * EXPLORE_EVERY :]
    assert tail.count(call.best) == len(tail) - 2  # settled at the peak's rows, one exploring iteration in 32


def test_on_a_gpu_curve_it_stays_at_the_full_batch_and_explores_below_it() -> None:
    rows = _run(CallSize(64), H200_MS, 4 * EXPLORE_EVERY)
    explored = [(i, r) for i, r in enumerate(rows) if r != 64]
    assert explored == [(EXPLORE_EVERY * k - 1, 48) for k in range(1, 5)], explored  # one iteration in 32, at 48 rows


def test_off_it_is_always_max_batch_and_it_never_exceeds_what_is_resident() -> None:
    assert set(_run(CallSize(64, tune=False), CPU_MS, 3 * EXPLORE_EVERY)) == {64}
    assert max(_run(CallSize(64), CPU_MS, 3 * EXPLORE_EVERY, resident=20)) <= 64  # limited or not, never above max_batch
    call = CallSize(64, explore_every=1)
    call.best, cost = 24, _curve(CPU_MS)
    assert all(call.rows(30, cost) <= 30 for _ in range(6))  # an exploring call takes no more rows than are resident


def test_the_engine_runs_the_best_rate_size_and_the_images_do_not_change() -> None:
    """4 rows resident, a call of up to 4: on a curve where 2 rows do the most rows per second, each iteration runs 2
    (the rows take turns), every 32nd another size; the images are those of an offline run."""
    engine, unet = _engine(max_batch=4, max_resident=8, tune_call_size=True)
    engine.cost = _set_cost({1: 0.1, 2: 0.12, 3: 0.4, 4: 0.5})  # 10, 16.7, 7.5 and 8 rows/s
    jobs = [engine.submit(Job(ImageRequest(seed, 2, ChainSpec(40, "ddpm")), timeout_s=600)) for seed in (1, 2)]
    rows = []
    while not all(job.done for job in jobs):
        before = sum(job.steps_done for job in jobs)
        engine._iterate()
        rows.append(sum(job.steps_done for job in jobs) - before)
    assert rows[: EXPLORE_EVERY - 1] == [2] * (EXPLORE_EVERY - 1) and rows[EXPLORE_EVERY - 1] == 1, rows  # then one below
    assert engine.call_size.best == 2
    for job in jobs:
        assert job.error is None
        assert (job.images - _offline(unet, job)).abs().max().item() < BATCH_ROUNDING  # type: ignore[operator]


def test_the_warm_up_runs_each_size_whole_and_does_not_measure_its_cold_first_call() -> None:
    """A warm-up job is there for its shape: its rows run in one call whatever the call size (a cost model that
    favoured 1 row split the max-batch warm-up into 1-row calls, and that size was never measured); and a size's first
    call (the shape's primitives built, the allocator grown: up to 3x a warm call on a CPU) is not its cost. Before,
    one cold sample at 2 rows made the tiny model's server learn a call size of 1, and two servers split the same
    3-image request differently (tests/test_response_cache.py saw other bits)."""
    engine, _ = _engine(max_batch=4, max_resident=8, tune_call_size=True)
    engine.cost.observe(1, 0.01)
    engine.cost.observe(2, 1.0)  # 2 and 4 rows predicted far slower per row than 1: the call size would be 1
    assert engine.call_size.rows(4, engine.cost) == 1
    calls: list[int] = []
    eps = engine.model.eps_model
    engine.model.eps_model = lambda x, t, *labels: calls.append(x.shape[0]) or eps(x, t, *labels)  # type: ignore[assignment]
    engine.warmup(1, sizes={1}, shape_sizes={4})
    assert 4 in calls and set(calls) == {1, 4}, calls  # the 4-row job in 4-row calls
    assert engine.cost._count[4] == calls.count(4) - 1 >= 1  # its first call not measured, the next ones are
    assert engine.call_size.tune  # the call size tunes again after the warm-up


@pytest.mark.parametrize("scale", [2.0, 0.0])
def test_a_call_size_below_the_full_batch_counts_unet_rows(scale: float) -> None:
    """On a curve whose best is 2 U-Net rows, a call takes one guided image (its null-label row beside it: 2 rows),
    not two (4 rows, 0.5 s against 0.12); unguided images of the same model take 2 a call."""
    engine = _conditional_engine(max_batch=4, max_resident=8, tune_call_size=True)
    engine.cost = _set_cost({1: 0.1, 2: 0.12, 3: 0.4, 4: 0.5})
    jobs = [engine.submit(Job(ImageRequest(seed, 2, ChainSpec(10, "ddpm"), (0, 1), scale), timeout_s=600)) for seed in (1, 2)]
    rows = []
    for _ in range(EXPLORE_EVERY - 1):  # before the first exploring iteration
        before = sum(job.steps_done for job in jobs)
        engine._iterate()
        rows.append(sum(job.steps_done for job in jobs) - before)
    assert engine.call_size.best == 2
    assert rows[:10] == [1 if scale else 2] * 10, rows


@pytest.mark.parametrize("tune", [True, False])
def test_the_server_reports_the_call_size_and_plans_with_it(model_dir, tune: bool) -> None:  # type: ignore[no-untyped-def]
    client, state = app_and_state(model_dir, max_batch=8, tune_call_size=tune)
    with client as c:
        wait_ready(c)
        state.engine.cost = _set_cost({1: 0.01, 4: 0.012, 8: 0.2})  # 4 rows: 333 rows/s, 8: 40
        assert c.post("/generate", json={"seed": 1, "steps": 3}).status_code == 200
        assert metric(c, "ddpm_call_size_rows") == (4 if tune else 8)
        job = Job(ImageRequest(5, 8, ChainSpec(10, "ddpm")), timeout_s=600)
        # 80 row-calls at the call size: 20 iterations of 4 rows (0.24 s), or 10 of 8 (2 s)
        assert state.engine.predicted_seconds(job) == pytest.approx(0.24 if tune else 2.0, abs=0.02)
