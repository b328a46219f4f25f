"""The waiting jobs, under one admission policy chosen once (DDPM_SCHEDULING), after vLLM's
``request_queue.py``: the engine asks ``take(free)`` for the images that join the running batch.

Priorities first (``PriorityLevels``, vLLM's convention: a lower value is served first): a job waits
only behind jobs of its own or a better priority; within a level, the policy below decides.

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

    def take_first(self, free: int) -> list[tuple[Job, int]]:
        """The first image of each job none of whose images has joined yet, in turn order, at most ``free``:
        what the rows kept for newcomers admit (``Engine._admit``)."""
        new: list[tuple[Job, int]] = []
        for key, jobs in list(self._turns.items()):
            for job in list(jobs):
                if len(new) >= free:
                    break
                if len(job.pending) == job.n:
                    new.append((job, job.pending.popleft()))
                    if not job.pending:
                        jobs.remove(job)
            if not jobs:
                del self._turns[key]
        self.images -= len(new)
        return new

    def remove(self, jobs: list[Job]) -> None:
        """Drop ``jobs`` (failed, cancelled) with their images not yet admitted."""
        for job in jobs:
            self.images -= len(job.pending)
            job.pending.clear()
        self._without({job.id for job in jobs})

    def detach(self, job: Job) -> bool:
        """Take ``job`` out with its waiting images kept (to wait at another priority): whether it was here."""
        if not self._without({job.id}):
            return False
        self.images -= len(job.pending)
        return True

    def _without(self, ids: set[int]) -> bool:
        """The turns without these jobs (a turn left empty goes): whether any was there."""
        found = False
        for key in list(self._turns):
            queue = collections.deque(j for j in self._turns[key] if j.id not in ids)
            found |= len(queue) < len(self._turns[key])
            if queue:
                self._turns[key] = queue
            else:
                del self._turns[key]
        return found

    def attach(self, job: Job) -> None:
        """``job`` with its waiting images, at the end of its turn's queue."""
        self._turns.setdefault(self._key(job), collections.deque()).append(job)
        self.images += len(job.pending)

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


class PriorityLevels:
    """One queue of the policy per priority value, the lowest value first: a job waits only behind jobs
    of its own priority or a better one. Images ahead and the work ahead (U-Net row-calls) are counted per
    level without a walk over the jobs of other levels."""

    def __init__(self, policy: type[RequestQueue]) -> None:
        self.policy = policy
        self.admits_while_running = policy.admits_while_running
        self._levels: dict[int, RequestQueue] = {}
        self.images = 0

    def __bool__(self) -> bool:
        return self.images > 0

    def add(self, job: Job) -> None:
        self._level(job.priority).add(job)
        self.images += job.n

    def _level(self, priority: int) -> RequestQueue:
        """This priority's queue, made where none waits at it yet."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = self.policy()
        return level

    def take(self, free: int) -> list[tuple[Job, int]]:
        return self._take(free, first_only=False)

    def take_first(self, free: int) -> list[tuple[Job, int]]:
        """The first image of each job not yet started, better priorities first (``RequestQueue.take_first``)."""
        return self._take(free, first_only=True)

    def _take(self, free: int, first_only: bool) -> list[tuple[Job, int]]:
        new: list[tuple[Job, int]] = []
        for priority in sorted(self._levels):
            if len(new) >= free:
                break
            level = self._levels[priority]
            new.extend(level.take_first(free - len(new)) if first_only else level.take(free - len(new)))
            if not level:
                del self._levels[priority]
        self.images -= len(new)
        return new

    def remove(self, jobs: list[Job]) -> None:
        for priority in {job.priority for job in jobs}:
            level = self._levels.get(priority)
            if level is not None:
                before = level.images
                level.remove([job for job in jobs if job.priority == priority])
                self.images -= before - level.images
                if not level:
                    del self._levels[priority]

    def move(self, job: Job, priority: int) -> None:
        """``job`` at ``priority`` from now: its images still waiting (if any) wait at that level, behind its jobs."""
        old = self._levels.get(job.priority)
        waiting = old is not None and old.detach(job)
        if old is not None and not old:
            del self._levels[job.priority]
        job.priority = priority
        if waiting:
            self._level(priority).attach(job)

    def jobs(self) -> list[Job]:
        return [job for priority in sorted(self._levels) for job in self._levels[priority].jobs()]

    def images_ahead(self, job: Job) -> int:
        """Images of jobs served before this one: every better level's, and the earlier ones of its own."""
        ahead = sum(level.images for priority, level in self._levels.items() if priority < job.priority)
        own = self._levels.get(job.priority)
        return ahead + (own.images_ahead(job) if own is not None else 0)

    def calls_at_or_above(self, priority: int, dated_only: bool = False) -> tuple[int, int]:
        """(U-Net rows, U-Net row-calls) of the images waiting at this priority or a better one (a guided image
        takes 2 rows: ``ImageRequest.rows_per_image``): the work a new job of this
        priority waits behind (admission control's estimate); ``dated_only``: of jobs with a deadline only
        (what a job with a deadline waits behind: it joins through the rows kept for newcomers, and rows
        with a deadline go first)."""
        rows = calls = 0
        for level_priority, level in self._levels.items():
            if level_priority <= priority:
                for job in level.jobs():
                    if dated_only and job.deadline_s is None:
                        continue
                    rows += len(job.pending) * job.request.rows_per_image
                    calls += len(job.pending) * job.row_calls
        return rows, calls


def create_request_queue(scheduling: str) -> PriorityLevels:
    try:
        return PriorityLevels(POLICIES[scheduling])
    except KeyError:
        raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING_NAMES)}, got {scheduling!r}") from None
