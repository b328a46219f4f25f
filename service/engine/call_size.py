"""How many rows one U-Net call takes while more are resident (the call size): ``max_batch``, or fewer
where the measured cost curve does more rows per second with fewer.

On a GPU the cost of a call grows far slower than its rows up to the largest batch (H200: 64 rows ~2x one
row), so the call size stays ``max_batch``. On a CPU the curve can turn over: the shipped U-Net, compiled,
bf16, 1 thread, on a 2-core AVX-512 EPYC (2026-12-04) does 349 rows/s at 24 and 32 rows and 282 at 64
(the U-Net alone, ``benchmarks/unet_cost_curve.py``). Running 24-32 rows a call while the rest sit out
(``step_scheduler``: every resident row advances again within ``STARVE_AFTER`` iterations) served the
engine's closed loop 1.135x faster there (``benchmarks/call_size_ab.py --engine``: 336 against 296 rows/s,
the median of 6 rounds; BENCHMARKS "Scheduling"), and each iteration is shorter, and so is the wait of a
request that arrives during one.

The size is learned, not configured, since it depends on the machine, the model and the precision. The
engine's cost model (``IterationCost``: a moving average of an iteration's seconds per size) says which
measured size has the best rate; it runs that one, unless the full ``max_batch`` is within ``MARGIN`` of
it (noise must not shrink a GPU's calls). To find a peak that the sizes it happens to run do not show,
every ``EXPLORE_EVERY``-th iteration that the call size limits runs another size instead: the nearest
grid sizes below and above the best (the grid: ``max_batch`` x 1/8, 1/4, 3/8, 1/2, 3/4, 1) and
``max_batch`` itself, in turn, so the averages around the best and the full batch's stay current and the
best moves to a better neighbour when the machine's curve moves (hill climbing). Where a neighbour's measured
rate is within ``MARGIN`` of the best's (a plateau), the next size past it is tried too: the shipped U-Net on a
2-core AVX-512 EPYC (2026-12-04) does 330 rows/s at 64 rows, 328 at 48 and 382 at 32, and a climb that stopped
at 48 served a closed loop at 64 rows, 13% below the peak. An exploring iteration costs little on either
curve: its rows run, only at a rate a little worse than the best's.

Sizes are U-Net rows (a guided sample takes two, its null-label row beside it), as the cost model measures
them: a size learned below ``max_batch`` limits a call's U-Net rows (on the plateau curve above, 48 rows cost 14%
more per row than 32). The full batch stays ``max_batch`` samples, guided or not: on a GPU, counting rows there
would halve a guided call for little gain (128 rows cost ~1.4x 64 on the H200, interpolated).
"""

from __future__ import annotations

import bisect

from service.engine.iteration_cost import IterationCost

GRID = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)  # of max_batch: the sizes exploration tries
EXPLORE_EVERY = 32  # every this many iterations that the call size limits, one runs another size
MARGIN = 0.05  # fewer rows than max_batch only for a measured rate better than the full batch's by more than this


class CallSize:
    def __init__(self, max_batch: int, tune: bool = True, explore_every: int = EXPLORE_EVERY, margin: float = MARGIN) -> None:
        self.max_batch = max_batch
        self.tune = tune  # False: every call takes up to max_batch rows
        self.explore_every = explore_every
        self.margin = margin
        self.grid = sorted({max(1, round(max_batch * f)) for f in GRID})
        self.best = max_batch  # the size with the best measured rate (what the engine plans with)
        self._limited = 0  # iterations the call size limited (more rows resident than it)
        self._turn = 0  # which size the next exploring iteration tries: below, above, max_batch (below first after a move)

    def rows(self, resident: int, cost: IterationCost) -> int:
        """The most rows this iteration's U-Net call takes, ``resident`` rows being in the running batch."""
        if not self.tune:
            return self.max_batch
        best = cost.best_rate_rows(self.max_batch, self.margin)
        if best != self.best:
            self.best, self._turn = best, 0
        if resident <= self.best:
            return self.best
        self._limited += 1
        if self._limited % self.explore_every:
            return self.best
        return self._explore(resident, cost)

    def _explore(self, resident: int, cost: IterationCost) -> int:
        below, above = bisect.bisect_left(self.grid, self.best) - 1, bisect.bisect_right(self.grid, self.best)
        sizes = (*self._neighbours(below, -1, cost), *self._neighbours(above, 1, cost), self.max_batch)
        tries = list(dict.fromkeys(size for size in sizes if size != self.best))
        if not tries:
            return self.best
        size = tries[self._turn % len(tries)]
        self._turn += 1
        return min(size, resident)

    def _neighbours(self, i: int, step: int, cost: IterationCost) -> list[int]:
        """The grid's nearest size from index ``i`` on, away from the best by ``step``, and the first size past the
        sizes whose measured rate is within the margin of the best's (a plateau), if that is another."""
        found: list[int] = []
        best = cost.measured_seconds(self.best)
        while 0 <= i < len(self.grid):
            size = self.grid[i]
            found = found or [size]
            seconds = cost.measured_seconds(size)
            if best is None or seconds is None or size / seconds < (1 - self.margin) * self.best / best:
                return [*found, size]
            i += step
        return found
