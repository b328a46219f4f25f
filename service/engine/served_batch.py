"""The engine's running batch: ``ddpm.running_batch.RunningBatch`` (the rows' maths state, shared with the
offline sampler) plus what the step scheduler reads per row, in host arrays that move with their rows:
when the row joined, its job's priority, deadline and bounded-slowdown target, the iterations it has sat
out, its job's id."""

from __future__ import annotations

import numpy as np
import torch

from ddpm.chain_table_store import ChainTableStore
from ddpm.image_request import ImageRequest
from ddpm.running_batch import RunningBatch
from service.engine.job import Job


def _request_of(job: Job) -> ImageRequest:
    return job.request


class ServedBatch(RunningBatch):
    owners: list[tuple[Job, int]]  # type: ignore[assignment]

    def __init__(self, capacity: int, image_shape: tuple[int, ...], store: ChainTableStore, device: torch.device,
                 conditional: bool = False, null_label: int = 0) -> None:  # fmt: skip
        super().__init__(capacity, image_shape, store, device, conditional, null_label, request_of=_request_of)
        self.joined_host = np.zeros(capacity, dtype=np.int64)  # the iteration clock when the row joined
        self.priority_host = np.zeros(capacity, dtype=np.int64)  # its job's priority (lower runs first)
        self.due_host = np.full(capacity, np.inf)  # its job's deadline (monotonic seconds; inf: none)
        self.soft_due_host = np.full(capacity, np.inf)  # its job's bounded-slowdown target (Job.soft_due; inf: none)
        self.soft_step_host = np.zeros(capacity)  # the seconds of an iteration of its job's rows alone (Job.soft_step_s)
        self.waited_host = np.zeros(capacity, dtype=np.int64)  # iterations sat out in a row
        self.job_host = np.zeros(capacity, dtype=np.int64)  # its job's id

    def jobs(self) -> list[Job]:
        return list({job.id: job for job, _ in self.owners}.values())

    def add(self, owners: list[tuple[Job, int]], x: torch.Tensor, seeds: torch.Tensor, clock: int = 0) -> None:  # type: ignore[override]
        """Rows at the end for ``owners`` (job, image index), joining at iteration ``clock``."""
        start = self.n
        super().add(owners, x, seeds)
        rows = slice(start, self.n)
        self.joined_host[rows] = clock
        self.priority_host[rows] = [job.priority for job, _ in owners]
        self.due_host[rows] = [np.inf if job.due is None else job.due for job, _ in owners]
        self.soft_due_host[rows] = [np.inf if job.soft_due is None else job.soft_due for job, _ in owners]
        self.soft_step_host[rows] = [job.soft_step_s for job, _ in owners]
        self.waited_host[rows] = 0
        self.job_host[rows] = [job.id for job, _ in owners]

    def advance(self, new_x: torch.Tensor, x0: torch.Tensor | None) -> None:
        m = new_x.shape[0]
        super().advance(new_x, x0)
        self.waited_host[:m] = 0
        self.waited_host[m : self.n] += 1

    def _host_arrays(self) -> tuple[np.ndarray, ...]:
        return (*super()._host_arrays(), self.joined_host, self.priority_host, self.due_host, self.soft_due_host,
                self.soft_step_host, self.waited_host, self.job_host)  # fmt: skip

    def steps_of(self, job_id: int) -> int:
        """Steps done by the job's rows in the batch (its steps count on the host: not per iteration)."""
        rows = np.flatnonzero(self.job_host[: self.n] == job_id)
        return int((self.calls_host[rows] - 1 - self.pos_host[rows]).sum())

    def rows_of(self, job_ids: set[int]) -> list[int]:
        """The rows of these jobs (a failure, a cancellation: not per iteration)."""
        return [row for row, (job, _) in enumerate(self.owners) if job.id in job_ids]
