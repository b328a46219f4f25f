"""What an iteration costs at a batch size, measured as the engine runs: the scheduler's slack and the
admission control's prediction read it.

Per batch size (rows in the U-Net call: a guided sample is two, its null-label row beside it) an
exponential moving average of the seconds an iteration took (over a size's first ``1/alpha`` iterations
their plain mean: a cold first iteration does not linger);
a size between two measured ones is interpolated linearly, one below them costs what the smallest
measured does, one beyond them is extrapolated from the per-row cost of the largest two (at least half
the largest's own per-row cost). Exact sizes, not buckets: on a CPU 3 rows cost ~0.75x what 4 do, and a
bucket's figure would make the scheduler run fewer rows than a deadline allows. Nothing measured yet:
``None`` (the engine then refuses nothing for its deadline and orders rows by priority alone).
"""

from __future__ import annotations

import bisect
import threading

import numpy as np


class IterationCost:
    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self._seconds: dict[int, float] = {}  # rows -> EMA of an iteration's seconds
        self._count: dict[int, int] = {}  # rows -> iterations measured
        self._sizes: list[int] = []  # the measured sizes, sorted
        self._curve = (np.zeros(0, dtype=np.int64), np.zeros(0))  # the sizes and their seconds as arrays (seconds_of)
        self._lock = threading.Lock()

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        with self._lock:
            old = self._seconds.get(rows)
            if old is None:
                bisect.insort(self._sizes, rows)
                self._seconds[rows], self._count[rows] = seconds, 1
                self._curve = (np.asarray(self._sizes), np.asarray([self._seconds[size] for size in self._sizes]))
            else:
                self._count[rows] += 1
                weight = max(self.alpha, 1 / self._count[rows]) if self.alpha > 0 else 0.0  # alpha 0: a set figure (tests)
                self._seconds[rows] = old + weight * (seconds - old)
                self._curve[1][bisect.bisect_left(self._sizes, rows)] = self._seconds[rows]  # one float: a reader sees old or new

    def seconds(self, rows: int) -> float | None:
        """Predicted seconds of an iteration of ``rows`` rows (None before any measurement)."""
        if rows <= 0:
            return 0.0
        with self._lock:
            sizes, cost = self._sizes, self._seconds
            if not sizes:
                return None
            if rows in cost:
                return cost[rows]
            i = bisect.bisect_left(sizes, rows)
            if i == 0:
                return cost[sizes[0]]
            if i < len(sizes):
                lo, hi = sizes[i - 1], sizes[i]
                return cost[lo] + (cost[hi] - cost[lo]) * (rows - lo) / (hi - lo)
            b2 = sizes[-1]
            b1 = sizes[-2] if len(sizes) > 1 else b2
            t1, t2 = cost[b1], cost[b2]
            slope = max((t2 - t1) / (b2 - b1) if b2 > b1 else 0.0, t2 / b2 * 0.5)
            return t2 + slope * (rows - b2)

    def seconds_of(self, rows: np.ndarray) -> np.ndarray | None:
        """``seconds`` of each of ``rows`` (an integer array), in one pass (the scheduler's searches for the largest
        count within a time: one numpy call instead of a call per count)."""
        sizes, cost = self._curve  # a new size replaces the pair whole: consistent without the lock
        if not sizes.size:
            return None
        out = np.interp(rows, sizes, cost)  # exact at a measured size, linear between, the smallest's below them
        out[rows <= 0] = 0.0
        beyond = np.flatnonzero(rows > sizes[-1])
        if beyond.size:  # extrapolated as ``seconds`` does (rare: past the largest size measured)
            out[beyond] = [self.seconds(int(r)) for r in rows[beyond]]
        return out

    def measured_seconds(self, rows: int) -> float | None:
        """The figure of exactly ``rows`` rows, when that size has run (no interpolation)."""
        with self._lock:
            return self._seconds.get(rows)

    def chain_seconds(self, own: int, calls: int, steps_left: np.ndarray, rows: np.ndarray) -> float | None:
        """Seconds of ``calls`` iterations of ``own`` rows beside others, ``rows[i]`` rows each, that leave the call
        once their ``steps_left[i]`` iterations are done (None before any measurement)."""
        times = self.chain_times(own, calls, steps_left, rows, calls)
        return None if times is None else float(times[-1])

    def chain_times(self, own: int, calls: int, steps_left: np.ndarray, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        """Seconds from now to the end of each of the next ``horizon`` iterations: ``own`` rows in the first ``calls``
        of them, beside the others (as in ``chain_seconds``)."""
        order = np.argsort(steps_left, kind="stable")
        left, after = steps_left[order], np.append(np.cumsum(rows[order][::-1])[::-1], 0)  # after[i]: rows of i and on
        j = np.arange(1, horizon + 1)
        size = after[np.searchsorted(left, j, side="left")] + np.where(j <= calls, own, 0)  # rows in iteration j
        sizes, inverse = np.unique(size, return_inverse=True)
        seconds = [self.seconds(s) for s in sizes.tolist()]
        if any(s is None for s in seconds):
            return None
        return np.cumsum(np.asarray(seconds, dtype=np.float64)[inverse])

    def best_rate_rows(self, limit: int, margin: float) -> int:
        """The measured size up to ``limit`` with the most rows per second, when its rate beats ``limit`` rows'
        (measured or predicted) by more than ``margin``; else ``limit`` (also before any measurement)."""
        with self._lock:
            rates = {rows: rows / s for rows, s in self._seconds.items() if rows <= limit}
        full = self.seconds(limit)
        if not rates or full is None:
            return limit
        best = max(rates, key=lambda rows: (rates[rows], rows))  # a tie goes to the larger size
        return best if rates[best] > (1 + margin) * limit / full else limit

    @property
    def measured(self) -> bool:
        return bool(self._seconds)
