"""Waiting for engine jobs in tests that drive an ``Engine`` without HTTP."""

from __future__ import annotations

import time

from service.engine.job import Job


def wait_done(*jobs: Job, timeout: float = 60.0) -> None:
    """Until every job is done (answered, failed or timed out); a test fails when that takes over ``timeout`` s."""
    end = time.monotonic() + timeout
    while not all(job.done for job in jobs):
        assert time.monotonic() < end, "jobs did not finish"
        time.sleep(0.005)
