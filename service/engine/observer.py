"""What the engine reports as it runs (``service.metrics.Metrics`` implements it)."""

from __future__ import annotations

from service.engine.job import Job


class EngineObserver:
    """Hooks for metrics; every method is called from the engine thread. The default does nothing."""

    def on_iteration(self, batch_size: int, seconds: float) -> None: ...

    def on_admitted(self, job: Job) -> None: ...

    def on_job_done(self, job: Job) -> None: ...

    def on_load(self, queue_depth: int, running: int) -> None: ...

    def on_fault(self, stage: str, jobs: int) -> None: ...

    def on_preempted(self, rows_by_priority: dict[int, int]) -> None:
        """Rows that sat an iteration out (the batch held more than a U-Net call takes), by priority."""

    def on_refused(self, reason: str) -> None:
        """A request refused at submit by the engine (``deadline``: its own could not be met;
        ``accepted_deadlines``: it would make an accepted request late)."""
