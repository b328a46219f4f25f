"""Identical requests in flight share one engine job (request collapsing: Varnish's waiting list, nginx's
``proxy_cache_lock``). The response cache answers a request whose images are done; this answers one whose
images are being made: ten clients sending the same request at once (a page's example, a retry while the
first try still runs, a load balancer's retry) cost one request's U-Net calls, not ten.

A request shares a job only where that cannot serve it worse than a job of its own: the job is neither
done nor cancelled, its deadline is no later than the request's (a request with a deadline does not share a job
without one), and it runs at the request's priority or a better one: a more urgent request raises the job's priority
to its own (priority inheritance, ``Engine.promote``), where it used to compute the same images again beside it. The
job is cancelled when its last waiter has gone away and ``DDPM_RETRY_GRACE_S`` has passed without another
sharing it (``JobHandle.leave``), so a client that gives up and sends the request again finds its first try still
running. Only the request that submitted the job counts against its client's quota and in the engine's answer-time
reserve: the others add no work. Off with the response cache (``DDPM_RESPONSE_CACHE_MB=0``: every request computes
its own images).

A request for part of a job's images (images 2..5 of a seed while 0..63 are being made) shares it too, once every
image of that job is in the running batch (``running_whole``): it then ends within its chain's calls, no later than a
job of the part's own, which would need all of them. A job with images still queued may take longer than the part
alone would (its rows wait for room), so a part gets a job of its own then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from service.api.job_handle import JobHandle
from service.engine.job import Job
from service.response_cache import ImageKey, range_offset


def running_whole(job: Job) -> bool:
    """Whether every image of ``job`` is in the running batch (none waits for room: ``pending`` only shrinks)."""
    return job.first_admitted is not None and not job.pending


def serves_as_well(job: Job, deadline_s: float | None, arrived: float) -> bool:
    """Whether a request that arrived at ``arrived`` with ``deadline_s`` is served at least as well by ``job``, at the
    request's priority or a better one, as by a job of its own."""
    if job.cancelled or job.done:
        return False
    if deadline_s is None:
        return True
    return job.deadline_s is not None and job.created + job.deadline_s <= arrived + deadline_s


class InFlightRequests:
    """The handle of each job in flight, by the key of the images it makes (event-loop thread only)."""

    def __init__(self) -> None:
        self._handles: dict[ImageKey, JobHandle] = {}
        self._families: dict[ImageKey, set[ImageKey]] = {}  # the keys in flight by family (ImageKey.family): where a part is found

    def __len__(self) -> int:
        return len(self._handles)

    def join(self, key: ImageKey, deadline_s: float | None, arrived: float, stream: bool,
             promote: Callable[[Job], bool]) -> JobHandle | None:  # fmt: skip
        """The handle of a job in flight that makes ``key``'s images (all of them, or more once it runs whole) and serves
        this request as well as its own would (now shared by it, ``promote``d to its priority), or None."""
        handle = next((h for h in self._making(key) if serves_as_well(h.job, deadline_s, arrived) and promote(h.job)), None)
        return None if handle is None else handle.share(stream)  # (none: done or given up, or not wanted as soon)

    def _making(self, key: ImageKey) -> Iterator[JobHandle]:
        """The jobs in flight that make ``key``'s images: its own key's, then those running whole that hold them."""
        if key in self._handles:
            yield self._handles[key]
        for other in self._families.get(key.family, ()):
            if other != key and range_offset(key.request, other.request) is not None and running_whole(self._handles[other].job):
                yield self._handles[other]

    def add(self, key: ImageKey, handle: JobHandle) -> None:
        """A job just submitted for ``key``: identical requests (and, once it runs whole, requests for part of it) may
        share it until it is done."""
        self._handles[key] = handle
        self._families.setdefault(key.family, set()).add(key)
        handle.done.add_done_callback(lambda _: self._forget(key, handle))

    def _forget(self, key: ImageKey, handle: JobHandle) -> None:
        if self._handles.get(key) is handle:
            del self._handles[key]
            family = self._families[key.family]
            family.discard(key)
            if not family:
                del self._families[key.family]
