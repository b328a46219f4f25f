"""The bridge from the engine thread to asyncio: a submitted job seen from the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.engine.errors import DeadlineExceeded
from service.engine.job import Job

log = logging.getLogger("ddpm.server")


@dataclass
class ProgressEvent:
    steps_done: int
    total: int


class JobHandle:
    """A submitted job seen from the event loop: an awaitable result and its latest progress.

    Progress keeps only the newest event (a stalled stream reader costs O(1) memory, not one event
    per iteration). ``wait`` and ``events`` never outlive the job's deadline by more than
    ``BACKSTOP_S``: if the engine has not answered by then (a hung device call), the job is
    cancelled and answered 504 here."""

    BACKSTOP_S = 5.0

    def __init__(
        self, job: Job, loop: asyncio.AbstractEventLoop, on_release: Callable[[], None] | None = None, stream: bool = False
    ) -> None:
        self.job = job
        self.done = loop.create_future()
        self._on_release = on_release
        self._latest: ProgressEvent | None = None
        self._progress = asyncio.Event()
        job.on_done = lambda j: loop.call_soon_threadsafe(self._set_done)
        if stream:  # only a stream reads progress: other jobs must not wake the event loop every iteration
            job.on_progress = lambda j: loop.call_soon_threadsafe(self._set_progress, ProgressEvent(j.steps_done, j.n * j.calls))

    def _set_done(self) -> None:
        if not self.done.done():
            self.done.set_result(self.job)
            if self._on_release is not None:
                self._on_release()

    def _set_progress(self, event: ProgressEvent) -> None:
        self._latest = event
        self._progress.set()

    @property
    def pending_progress(self) -> int:
        """Progress events held for the reader (0 or 1)."""
        return int(self._latest is not None)

    def _backstop(self) -> float:
        """Seconds until the engine is considered unresponsive for this job."""
        return self.job.deadline + self.BACKSTOP_S - time.monotonic()

    def _give_up(self) -> Job:
        self.job.cancel()
        if self.job.error is None and not self.job.done:
            self.job.error = DeadlineExceeded(f"deadline of {self.job.timeout_s:g} s exceeded (the engine did not answer)")
        log.error("engine did not answer job %s by its deadline", self.job.id, extra={"fields": {"request_id": self.job.request_id}})
        self._set_done()
        return self.job

    async def wait(self, is_disconnected: object, poll_s: float = 0.25) -> Job:
        """The finished job; cancels it when the client goes away (polled every poll_s)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(self.done), poll_s)
            except asyncio.TimeoutError:
                if await is_disconnected():  # type: ignore[operator]
                    self.job.cancel()
                    try:
                        return await asyncio.wait_for(asyncio.shield(self.done), max(self._backstop(), poll_s))
                    except asyncio.TimeoutError:
                        return self._give_up()
                if self._backstop() < 0:
                    return self._give_up()

    async def events(self, min_interval_s: float = 0.1, tick_s: float | None = None) -> AsyncIterator[ProgressEvent | None]:
        """Progress, at most one event per min_interval_s, until the job is done; with ``tick_s``, also
        None after each tick_s without progress (a stream's cue for queue positions and keep-alives)."""
        last = 0.0
        while not self.done.done():
            getter = asyncio.ensure_future(self._progress.wait())
            backstop = max(self._backstop(), 0.0)
            timeout = backstop if tick_s is None else min(backstop, tick_s)
            finished, _ = await asyncio.wait({getter, self.done}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if getter not in finished:
                getter.cancel()
                if finished:  # the answer
                    break
                if self._backstop() <= 0:  # neither progress nor an answer by the deadline
                    self._give_up()
                    break
                yield None
                continue
            self._progress.clear()
            event, self._latest = self._latest, None
            now = time.monotonic()
            if event is not None and now - last >= min_interval_s:
                last = now
                yield event
