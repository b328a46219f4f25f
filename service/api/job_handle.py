"""The bridge from the engine thread to asyncio: a submitted job seen from the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ddpm.image_request import ImageRequest
from service.api.preview_log import Preview, PreviewLog, PreviewReader
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
    per iteration), and every reader sees it (identical requests in flight share one handle: ``share``,
    service/api/in_flight.py). The job is cancelled when its last waiter goes away, not its first (after
    ``grace_s``, for a retry to share it).
    ``wait`` and ``events`` never outlive the job's deadline by more than ``BACKSTOP_S``: if the engine
    has not answered by then (a hung device call), the job is cancelled and answered 504 here."""

    BACKSTOP_S = 5.0

    def __init__(
        self, job: Job, loop: asyncio.AbstractEventLoop, on_release: Callable[[], None] | None = None, stream: bool = False
    ) -> None:
        self.job = job
        self.done = loop.create_future()
        self.waiters = 1  # requests waiting on this job: the one that submitted it, and those that share it
        self.grace_s = 0.0  # how long the job runs on once its last waiter went away (DDPM_RETRY_GRACE_S, where it may be shared)
        self._abandoned: asyncio.TimerHandle | None = None  # the grace's end, while nobody waits
        self._loop = loop
        self._on_release = on_release
        self._latest: ProgressEvent | None = None
        self._version = 0  # progress events so far: each reader remembers the last it saw
        self._changed = loop.create_future()  # resolved (and replaced) at each progress event
        job.on_done = lambda j: loop.call_soon_threadsafe(self._set_done)
        self.previews = PreviewLog()  # the partial images, as the streams waiting on the job read them
        if job.previews:
            job.on_preview = lambda j, k, index, image: loop.call_soon_threadsafe(self._add_preview, (k, index, image))
        if stream:
            self.watch_progress()

    def watch_progress(self) -> None:
        """Have the engine report progress (only a stream reads it: other jobs must not wake the event loop
        every iteration)."""
        loop = self._loop
        self.job.on_progress = lambda j: loop.call_soon_threadsafe(self._set_progress, ProgressEvent(j.steps_done, j.n * j.calls))

    def share(self, stream: bool) -> JobHandle:
        """One more request waits on this job (an identical one: service/api/in_flight.py)."""
        self.waiters += 1
        if self._abandoned is not None:  # a retry within the grace: the job is wanted again
            self._abandoned.cancel()
            self._abandoned = None
        if stream:
            self.watch_progress()
        return self

    def leave(self) -> None:
        """A waiter went away. The job runs on while others wait; when none does, it is cancelled after ``grace_s``
        unless a retry shared it meanwhile (at once without a grace)."""
        self.waiters -= 1
        if self.waiters > 0 or self.done.done():
            return
        if self.grace_s > 0:
            self._abandoned = self._loop.call_later(self.grace_s, self._cancel_if_abandoned)
        else:
            self.job.cancel()

    def _cancel_if_abandoned(self) -> None:
        self._abandoned = None
        if self.waiters == 0:
            self.job.cancel()

    def _set_done(self) -> None:
        if not self.done.done():
            self.done.set_result(self.job)
            if self._on_release is not None:
                self._on_release()

    def _add_preview(self, preview: Preview) -> None:
        self.previews.add(preview)
        self._wake()

    def preview_reader(self, part: ImageRequest, previews: int) -> PreviewReader:
        """A reader of the partial images of ``part``'s images (all the job's, or a sharing part's) for a request that
        asked for ``previews`` of each: the job's where it makes as many (its creator's, an identical request's, a
        retry's), else none (a job makes them at its own fractions of the calls: service/engine/previews.py)."""
        wanted = previews > 0 and previews == self.job.previews
        return self.previews.reader(part.first - self.job.request.first, part.n if wanted else 0)

    def _set_progress(self, event: ProgressEvent) -> None:
        self._latest = event
        self._wake()

    def _wake(self) -> None:
        """Wake the readers (``events``): new progress, or a partial image."""
        self._version += 1
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = self._loop.create_future()

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

    async def wait(self, is_disconnected: object, poll_s: float = 0.25) -> Job | None:
        """The finished job, or None once the client went away (polled every poll_s: ``leave``)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(self.done), poll_s)
            except asyncio.TimeoutError:
                if await is_disconnected():  # type: ignore[operator]
                    self.leave()
                    return None
                if self._backstop() < 0:
                    return self._give_up()

    async def events(self, min_interval_s: float = 0.1, tick_s: float | None = None) -> AsyncIterator[ProgressEvent | None]:
        """Progress, at most one event per min_interval_s, until the job is done; with ``tick_s``, also
        None after each tick_s without progress (a stream's cue for queue positions and keep-alives)."""
        last, seen, shown, cued = 0.0, 0, None, 0
        while not self.done.done():
            if self._version == seen:  # nothing new: wait for progress, the answer or a tick
                changed = self._changed
                backstop = max(self._backstop(), 0.0)
                timeout = backstop if tick_s is None else min(backstop, tick_s)
                finished, _ = await asyncio.wait({changed, self.done}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if changed not in finished:
                    if finished:  # the answer
                        break
                    if self._backstop() <= 0:  # neither progress nor an answer by the deadline
                        self._give_up()
                        break
                    yield None
                    continue
            seen = self._version
            now = time.monotonic()
            if self._latest is not None and self._latest is not shown and now - last >= min_interval_s:
                last, shown = now, self._latest
                yield self._latest
            elif self.previews.made > cued:  # a partial image came (the same progress is not sent again for it)
                cued = self.previews.made
                yield None
