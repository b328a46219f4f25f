"""Identical requests in flight share one engine job (request collapsing: Varnish's waiting list, nginx's
``proxy_cache_lock``). The response cache answers a request whose images are done; this answers one whose
images are being made: ten clients sending the same request at once (a page's example, a retry while the
first try still runs, a load balancer's retry) cost one request's U-Net calls, not ten.

A request shares a job only where that cannot serve it worse than a job of its own: the job is neither
done nor cancelled, and is as urgent as the request asks (a priority value no higher than the request's, a
deadline no later than the request's; a request with a deadline does not share a job without one). The
job is cancelled when its last waiter has gone away and ``DDPM_RETRY_GRACE_S`` has passed without another
sharing it (``JobHandle.leave``), so a client that gives up and sends the request again finds its first try still
running. Only the request that submitted the job counts against its client's quota and in the engine's answer-time
reserve: the others add no work. Off with the response cache (``DDPM_RESPONSE_CACHE_MB=0``: every request computes
its own images).
"""

from __future__ import annotations

from service.api.job_handle import JobHandle
from service.engine.job import Job
from service.response_cache import ImageKey


def serves_as_well(job: Job, priority: int, deadline_s: float | None, arrived: float) -> bool:
    """Whether a request that arrived at ``arrived`` with ``priority`` and ``deadline_s`` is served at least as
    well by ``job`` as by a job of its own."""
    if job.cancelled or job.done or priority < job.priority:
        return False
    if deadline_s is None:
        return True
    return job.deadline_s is not None and job.created + job.deadline_s <= arrived + deadline_s


class InFlightRequests:
    """The handle of each job in flight, by the key of the images it makes (event-loop thread only)."""

    def __init__(self) -> None:
        self._handles: dict[ImageKey, JobHandle] = {}

    def __len__(self) -> int:
        return len(self._handles)

    def join(self, key: ImageKey, priority: int, deadline_s: float | None, arrived: float, stream: bool) -> JobHandle | None:
        """The handle of a job in flight that makes ``key``'s images and serves this request as well as its
        own would (now shared by it), or None."""
        handle = self._handles.get(key)
        if handle is None or not serves_as_well(handle.job, priority, deadline_s, arrived):  # done or given up: job.done or cancelled
            return None
        return handle.share(stream)

    def add(self, key: ImageKey, handle: JobHandle) -> None:
        """A job just submitted for ``key``: identical requests may share it until it is done."""
        self._handles[key] = handle
        handle.done.add_done_callback(lambda _: self._forget(key, handle))

    def _forget(self, key: ImageKey, handle: JobHandle) -> None:
        if self._handles.get(key) is handle:
            del self._handles[key]
