"""The waiting jobs, under one admission policy chosen once (DDPM_SCHEDULING), after vLLM's
``request_queue.py``: the engine asks ``take(free)`` for the images that join the running batch.

- ``continuous`` (:class:`FairQueue`): round robin over clients, then over each client's jobs, one
  image a turn; images join a batch that is already running. A client that floods the queue cannot
  make another client's single request wait behind its backlog, and a large job cannot starve the
  small ones behind it.
- ``request`` (:class:`FirstComeQueue`): request-level batching, first come first served over
  everyone, whole jobs while they fit; nothing joins until the running batch has finished its chain.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # torch-free at run time: the settings (and so `ddpm serve --help`) import the policy names
    from service.engine.job import Job

SchedulingName = Literal["continuous", "request"]
SCHEDULING_NAMES: tuple[str, ...] = get_args(SchedulingName)


class RequestQueue:
    """Jobs with images not yet admitted: one queue per turn key (arrival order), keys in turn order.
    Not thread-safe: the engine holds its lock around every call."""

    admits_while_running = True  # whether images may join a batch that is already running

    def __init__(self) -> None:
        self._turns: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self.images = 0  # images waiting

    def _key(self, job: Job) -> str:
        raise NotImplementedError

    def _take_turn(self, jobs: collections.deque[Job], free: int) -> list[tuple[Job, int]]:
        """The (job, image index) pairs one turn admits from the front of ``jobs`` (at most ``free``)."""
        raise NotImplementedError

    def __bool__(self) -> bool:
        return bool(self._turns)

    def add(self, job: Job) -> None:
        job.pending.extend(range(job.n))
        self._turns.setdefault(self._key(job), collections.deque()).append(job)
        self.images += job.n

    def take(self, free: int) -> list[tuple[Job, int]]:
        """The images that join the running batch now, at most ``free`` of them."""
        new: list[tuple[Job, int]] = []
        while len(new) < free and self._turns:
            key, jobs = next(iter(self._turns.items()))
            new.extend(self._take_turn(jobs, free - len(new)))
            if not jobs:
                del self._turns[key]
            else:
                self._turns.move_to_end(key)
        self.images -= len(new)
        return new

    def remove(self, jobs: list[Job]) -> None:
        """Drop ``jobs`` (failed, cancelled) with their images not yet admitted."""
        ids = {job.id for job in jobs}
        for job in jobs:
            self.images -= len(job.pending)
            job.pending.clear()
        for key in list(self._turns):
            queue = collections.deque(j for j in self._turns[key] if j.id not in ids)
            if queue:
                self._turns[key] = queue
            else:
                del self._turns[key]

    def jobs(self) -> list[Job]:
        return [job for queue in self._turns.values() for job in queue]

    def images_ahead(self, job: Job) -> int:
        """Images of earlier jobs still waiting (a job's queue position, counted in images)."""
        return sum(len(other.pending) for other in self.jobs() if other.id < job.id)


class FairQueue(RequestQueue):
    """continuous: one image per client per turn, and per job within a client."""

    def _key(self, job: Job) -> str:
        return job.client

    def _take_turn(self, jobs: collections.deque[Job], free: int) -> list[tuple[Job, int]]:
        job = jobs.popleft()
        taken = [(job, job.pending.popleft())]
        if job.pending:
            jobs.append(job)
        return taken


class FirstComeQueue(RequestQueue):
    """request: one queue over everyone; whole jobs in arrival order while they fit."""

    admits_while_running = False

    def _key(self, job: Job) -> str:
        return ""

    def _take_turn(self, jobs: collections.deque[Job], free: int) -> list[tuple[Job, int]]:
        job = jobs[0]
        taken = [(job, job.pending.popleft()) for _ in range(min(free, len(job.pending)))]
        if not job.pending:
            jobs.popleft()
        return taken


POLICIES: dict[str, type[RequestQueue]] = {"continuous": FairQueue, "request": FirstComeQueue}
assert tuple(POLICIES) == SCHEDULING_NAMES


def create_request_queue(scheduling: str) -> RequestQueue:
    try:
        return POLICIES[scheduling]()
    except KeyError:
        raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING_NAMES)}, got {scheduling!r}") from None
