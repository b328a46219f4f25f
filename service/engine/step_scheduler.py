"""Which resident rows advance this iteration, and how many (issue 37: step-level sharing, priorities and
deadlines). The running batch holds up to ``max_resident`` rows; one U-Net call takes at most ``max_batch``.

The order, all on the host (numpy over the rows' mirrors, no per-row Python):
  1. rows with a deadline, by priority then slack (the deadline less the predicted time to finish the
     chain at the current iteration cost): admission control keeps their work to what can be met, so
     they cannot crowd the others out for long;
  2. a row that has sat out ``starve_after`` iterations in a row (oldest first, half the count at most):
     whatever its priority, every resident row without a deadline advances again within a bounded number
     of iterations that deadlines leave room for (``starve_after + 1`` while the starving fit in half a
     call), so no request waits behind another's whole chain; the other half keeps going by the order
     below, so that a flood of starving rows (a call shortened for a deadline) cannot crowd out a short
     request either;
  3. then the lower priority value (vLLM's convention);
  4. then the fewer steps left of the row's request (shortest remaining first: a 10-call request beside a
     1000-step one runs every iteration, and the long one loses one row in 64 of its share). A request is
     done when its last row is, so its steps left are its slowest row's, and its rows go together, the
     slowest first: a request's rows do not drift apart. (Ranked row by row, a call that took part of a
     request left the rest one step behind, behind every row ahead of them from then on, and they ran only
     as starving rows: in a closed loop of six 16-image requests on the H200's curve, every request kept a
     few rows 40 iterations behind, and for those iterations 32 rows ran where 64 could; scheduling_sim.)

How many: ``max_batch`` at most; while requests with deadlines arrive, no more than an iteration of
``HEADROOM`` x the tightest recent accepted deadline costs, nor less than one of ``MIN_CALL_SHARE`` of the call
size (``iteration_limit``: a request arriving mid-iteration waits for that iteration first, and on a CPU a full
batch of 64 can cost more than an interactive deadline); fewer when a
row with a deadline needs iterations faster than that (an iteration of 64 rows costs ~10x one of 1 on a
CPU): the largest count whose predicted cost lets every chosen row with a deadline finish in ``SAFETY``
of the time it has left. Those rows always run (a starving row that ranks before them waits one more
iteration rather than push them past their deadline); the rest of the count is filled in the order above.
A request without a deadline has a soft one (``slowdown_limit``): ``MAX_SLOWDOWN`` x its time alone, which
keeps iterations short enough while it can still be met at the pace it was set at (a 10-call request beside a
64-row, 1000-step one on a CPU, where the full batch costs ~37x one row) and binds nothing once only shorter
iterations than its own rows' could meet it.

Counts are of rows (samples; ``max_batch`` is one call's); costs are of the U-Net rows they take (``unet_rows``:
a guided row is two, its null-label row beside it), as the cost model measures them. Before the order is
known a count's U-Net rows are taken at their most (the guided rows first), then exactly for the chosen ones.
A call size learned below the full batch (``call_size.py``) is of U-Net rows too (``max_unet_rows``): the first
rows in order whose U-Net rows fit it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.engine.iteration_cost import IterationCost

STARVE_AFTER = 8  # iterations a resident row may sit out in a row
SAFETY = 0.7  # a row with a deadline is planned to finish in this share of the time it has left
HEADROOM = 0.2  # while deadlines arrive, an iteration may take this share of the tightest one (a newcomer's wait)
MIN_CALL_SHARE = 0.25  # ... but never less than an iteration of this share of the call size (iteration_limit)
MAX_SLOWDOWN = 10.0  # a request without a deadline is planned to take at most this x its time alone


@dataclass(frozen=True)
class Choice:
    rows: np.ndarray  # the row indices that advance, in order (the running batch moves them to the front)
    count: int  # how many advance


def choose(
    n: int,
    max_batch: int,
    priority: np.ndarray,
    due: np.ndarray,
    remaining: np.ndarray,
    waited: np.ndarray,
    now: float,
    cost: IterationCost,
    starve_after: int = STARVE_AFTER,
    max_iteration_s: float | None = None,
    unet_rows: np.ndarray | None = None,
    job: np.ndarray | None = None,
    max_unet_rows: int | None = None,
) -> Choice | None:
    """The rows of [0, n) to advance, or None when every row advances (the common case: no reordering).
    ``max_iteration_s``: the longest an iteration may take (the engine's headroom for arriving deadlines).
    ``unet_rows``: the U-Net rows each row takes (None: one each). ``job``: each row's request (None: each row its
    own request). ``max_unet_rows``: the most U-Net rows a call takes (the learned call size, a guided row two)."""
    dated = np.isfinite(due[:n])  # rows with a deadline
    has_due = bool(dated.any())
    weight = None if unet_rows is None else unet_rows[:n]
    over_rows = max_unet_rows is not None and weight is not None and int(weight.sum()) > max_unet_rows
    if n <= max_batch and not has_due and max_iteration_s is None and not over_rows:
        return None
    guided = 0 if weight is None else int(np.count_nonzero(weight > 1))
    per_iteration = cost.seconds(min(n, max_batch) + min(n, max_batch, guided))
    count = min(n, max_batch)
    if max_iteration_s is not None and per_iteration is not None:
        if (cost.seconds(count + min(count, guided)) or 0.0) > max_iteration_s:  # else count fits: one cost call, the common case
            counts = np.arange(1, count)  # the most rows below count whose iteration fits
            count = _last_within(counts, cost.seconds_of(counts + np.minimum(counts, guided)), max_iteration_s, 1)
    if count >= n and not has_due and not over_rows:  # every row runs: their order changes nothing
        return None
    slack = due[:n] - now - remaining[:n] * (per_iteration or 0.0)  # inf - x = inf: rows without a deadline
    left, first = (remaining[:n], np.arange(n)) if job is None else _requests(job[:n], remaining[:n])
    starving = (waited[:n] >= starve_after) & ~dated
    if int(starving.sum()) > max(1, count // 2):  # the oldest take half the count at most: the rest goes by priority
        candidates = np.flatnonzero(starving)
        starving[candidates[np.lexsort((first[candidates], -waited[candidates]))[max(1, count // 2) :]]] = False
    # np.lexsort: the last key is the primary one (the deadline tier, then the starving, priority, slack, the request's
    # steps left, the request (where its rows begin: rows already in front stay there), its slowest rows first)
    order = np.lexsort((-remaining[:n], first, left, slack, priority[:n], -waited[:n] * starving, ~starving, ~dated))
    if over_rows:  # the first rows in order whose U-Net rows fit the call
        count = min(count, max(1, int(np.searchsorted(np.cumsum(weight[order]), max_unet_rows, side="right"))))  # type: ignore[index]
    if has_due and per_iteration is not None:
        order, count = _fast_enough(order, count, due, remaining, now, cost, weight)
    if count == n and np.array_equal(order[:count], np.arange(count)):
        return None
    return Choice(order, count)


def _requests(job: np.ndarray, remaining: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, of its request: the steps left (the most of its rows': a request is done when its last row is), and
    its first row in the batch."""
    _, first, inverse = np.unique(job, return_index=True, return_inverse=True)
    most = np.zeros(first.size, dtype=remaining.dtype)
    np.maximum.at(most, inverse, remaining)
    return most[inverse], first[inverse]


def _fast_enough(
    order: np.ndarray, count: int, due: np.ndarray, remaining: np.ndarray, now: float, cost: IterationCost,
    weight: np.ndarray | None,
) -> tuple[np.ndarray, int]:
    """The order with the chosen rows that have deadlines first, and the largest count <= ``count`` at whose
    predicted iteration cost (of the U-Net rows the first ``count`` take) every one of them finishes by its
    deadline (never fewer than they are)."""
    chosen = order[:count]
    urgent = chosen[np.isfinite(due[chosen])]
    if urgent.size == 0:
        return order, count
    is_urgent = np.zeros(due.size, dtype=bool)
    is_urgent[urgent] = True
    order = np.concatenate([urgent, order[~is_urgent[order]]])
    rows = np.arange(1, order.size + 1) if weight is None else np.cumsum(weight[order])  # U-Net rows of the first k + 1
    allowed = SAFETY * float(np.min((due[urgent] - now) / np.maximum(remaining[urgent], 1)))
    if count > urgent.size and (cost.seconds(int(rows[count - 1])) or 0.0) > allowed:  # the most rows below count that fit
        counts = np.arange(urgent.size + 1, count)
        count = _last_within(counts, cost.seconds_of(rows[counts - 1]), allowed, urgent.size)
    return order, count


def _last_within(counts: np.ndarray, seconds: np.ndarray | None, limit: float, floor: int) -> int:
    """The largest of ``counts`` (ascending) whose ``seconds`` are within ``limit``, else ``floor``."""
    if seconds is None:  # nothing measured (the callers search only once a measured count did not fit)
        return floor
    within = np.flatnonzero(seconds <= limit)
    return int(counts[within[-1]]) if within.size else floor


def iteration_limit(deadline_s: float, cost: IterationCost, call: int) -> float:
    """The longest an iteration may take while requests with deadlines arrive: ``HEADROOM`` x the tightest accepted
    lately (a newcomer first waits for the iteration in flight), but never less than an iteration of ``MIN_CALL_SHARE``
    of the call size costs: one request's tight deadline (anyone may send one) must not make every call tiny. At worst
    the calls are a quarter of the size: ~0.8 of the best rate on the compiled CPU curve, nothing a GPU's deadlines
    reach. (Tried and dropped: half the deadline's slack, its deadline less its reserve and its chain alone, instead
    of a fifth of it. The simulator gained bulk goodput, 0.845 -> 0.870 at the real cells' deadlines; two real A/B
    rounds lost it, 0.898 / 0.868 -> 0.855 / 0.775, with 2 late answers: BENCHMARKS, stop 52.)"""
    return max(HEADROOM * deadline_s, cost.seconds(max(1, int(MIN_CALL_SHARE * call))) or 0.0)


def slowdown_limit(
    soft_due: np.ndarray, soft_step: np.ndarray, priority: np.ndarray, remaining: np.ndarray, now: float
) -> float | None:
    """The longest an iteration may take so that every row of the best priority present whose job's
    bounded-slowdown target (``Job.soft_due``) can still be met finishes by it in ``SAFETY`` of the time
    left, or None. Can still be met: at the pace the target was set at (``soft_step``, an iteration of the
    job's rows alone), within ``SAFETY``. A target that only iterations shorter than that could meet, or one
    already passed (an overloaded server), binds nothing: rows without a deadline are never made to run in
    iterations too short for anyone to gain from. (Measured before this rule, issue 37: at 1.5x load every
    16-image bulk request's target, in the seconds before it passed, shrank the iterations to 1 row; 473 of
    2,736 iterations in a minute ran 1 row with ~190 rows waiting.)"""
    per_step = (soft_due - now) / np.maximum(remaining, 1)  # inf - x = inf: rows without a target
    live = np.isfinite(soft_due) & (SAFETY * per_step >= soft_step) & (soft_due > now) & (priority == priority.min())
    if not live.any():
        return None
    return SAFETY * float(np.min(per_step[live]))
