"""The time an answer takes after its images are done, which a deadline must leave room for (issue 37).

A request's deadline is the client's: arrival at the server to the answer in hand. The step scheduler plans
each request with a deadline to finish its images ``reserve_s`` before it (``Job.due``): the time it has
measured from an image done to its answer encoded (the event loop waking, the PNGs, the JSON) with its
spread, plus ``margin_s`` for what it cannot measure (writing the answer, the network, the client reading
it). Admission control, which predicts rather than plans, adds the expected time (``expected_s``): with the
whole reserve, one A/B round of the 1.5x cell at a 0.17 s deadline refused 39 of 216 requests (before: 1),
most of which the scheduler would have answered in time.

Measured before (2-core AVX-512 EPYC, compiled, the 1.5x cell of ``benchmarks/scheduling.py`` with a 0.21 s
deadline): the answers' time outside the engine was 7 ms at the median and 12 at the 99th percentile, of
which the server's own part 1.6 and 3.9; the one late answer of 226 was late only by that time. In the
simulator (``benchmarks/scheduling_sim.py --deadline-x 2``) an engine that did not know the 15 ms of each
answer's HTTP round trip answered 38-41% within deadline.

The estimate is TCP's retransmission timer's (RFC 6298): a smoothed mean and mean deviation, the reserve
their sum with 4 deviations, so that a spread of answer times is covered, not their average.

A request keeps at most ``MAX_SHARE`` of its deadline for its answer. Without a bound, one slow answer
could make the reserve exceed every deadline: every request with one refused, so no answer measured,
so the reserve never coming down (seen in the simulator: a first sample of 15 ms gives 45 ms, and a
trace of 0.045 s deadlines on the H200 curve refused 26,024 requests of 26,027). The bound leaves one
such lock-in: every deadline short enough that the engine's time fits it but not with the expected answer
time too. So an estimate no answer has renewed for ``FORGET_AFTER_S`` is forgotten when it alone would
refuse a request (``stale``, ``forget``): that request is admitted, and its answer measures afresh (a
circuit breaker's half-open probe).
"""

from __future__ import annotations

import time

ALPHA, BETA, K = 1 / 8, 1 / 4, 4  # RFC 6298's gains and deviation multiple
MAX_SHARE = 0.5  # of a deadline, the most kept for the answer
FORGET_AFTER_S = 60.0  # an estimate older than this may be forgotten rather than refuse a request


class AnswerTime:
    def __init__(self, margin_s: float = 0.0) -> None:
        self.margin_s = margin_s
        self.mean: float | None = None
        self.deviation = 0.0
        self.samples = 0
        self.last: float | None = None  # monotonic time of the latest answer measured

    def observe(self, seconds: float, at: float | None = None) -> None:
        """One answer's time from its last image done to its body encoded (at monotonic ``at``, default now)."""
        seconds = max(0.0, seconds)
        self.samples += 1
        self.last = time.monotonic() if at is None else at
        if self.mean is None:
            self.mean, self.deviation = seconds, seconds / 2
            return
        self.deviation = (1 - BETA) * self.deviation + BETA * abs(self.mean - seconds)
        self.mean = (1 - ALPHA) * self.mean + ALPHA * seconds

    @property
    def expected_s(self) -> float:
        """The answer's expected time (admission control's: a prediction, not a plan with margins)."""
        return 0.0 if self.mean is None else self.mean

    @property
    def reserve_s(self) -> float:
        """Seconds a deadline keeps for the answer: the measured time with its spread, and the margin."""
        measured = 0.0 if self.mean is None else self.mean + K * self.deviation
        return measured + self.margin_s

    def kept_of(self, deadline_s: float) -> float:
        """What a request with this deadline keeps for its answer: the reserve, at most ``MAX_SHARE`` of it."""
        return min(self.reserve_s, MAX_SHARE * deadline_s)

    def stale(self, now: float) -> bool:
        """An estimate that no answer has renewed for ``FORGET_AFTER_S``."""
        return self.last is not None and now - self.last > FORGET_AFTER_S

    def forget(self) -> None:
        self.mean, self.deviation, self.last = None, 0.0, None
