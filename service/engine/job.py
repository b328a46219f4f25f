"""One request as the engine sees it: what it asks for (``ddpm.image_request.ImageRequest``, unchanged from
the API), how it is served (priority, deadline, client), and what became of it."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from service.engine.errors import EngineError


@dataclass
class Job:
    """The images ``request`` asks for (seed, n, chain, labels, guidance, edit inputs), served within
    ``timeout_s``. A new request field is a field of ``ImageRequest``, not of this."""

    request: ImageRequest
    timeout_s: float
    client: str = ""  # who the job counts against: admission is round robin over clients
    # scheduling (issue 37): a lower priority value is served first (vLLM's convention); deadline_s: seconds
    # from arrival by which the answer is wanted (None: none; the request's timeout still applies)
    priority: int = 0
    deadline_s: float | None = None
    reserve_s: float = 0.0  # of the deadline, kept for the answer after the images are done (set by the engine: answer_time.py)
    # a job without a deadline: when it should be done to have run at most ``max_slowdown`` x its time alone
    # (set by the engine on arrival from its cost model; the scheduler keeps iterations short enough for it)
    soft_due: float | None = None
    soft_step_s: float = 0.0  # the seconds of one iteration of its rows alone: the pace its target was set at
    request_id: str | None = None  # for the log lines of faults
    routed_before_drain: bool = False  # sent here before the server stopped accepting connections: a draining engine admits it
    on_progress: Callable[[Job], None] | None = None
    # partial images (service/engine/previews.py): how many of each image, handed to on_preview(job, k, index, x0_hat)
    previews: int = 0
    on_preview: Callable[[Job, int, int, torch.Tensor], None] | None = None
    on_done: Callable[[Job], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    created: float = field(default_factory=time.monotonic)
    first_admitted: float | None = None
    finished: float | None = None
    images: torch.Tensor | None = None  # (n, C, H, W) float32 on CPU, filled as images finish
    images_done: int = 0
    error: EngineError | None = None
    pending: collections.deque[int] = field(default_factory=collections.deque)  # image indices not yet admitted
    cancelled: bool = False
    on_cancel: Callable[[Job], None] | None = None  # the engine's: a cancelled job leaves at its next iteration
    keys: list[int] | None = None  # the Philox key of each image (int64 bits), computed at submit
    # steps done, kept without per-iteration work: what rows that left had done (banked by the engine when
    # rows leave) plus what the running rows have done, read from the running batch when asked (``live_steps``)
    live_steps: Callable[[Job], int] | None = None
    rows_running: int = 0
    steps_banked: int = 0

    @property
    def steps_done(self) -> int:
        """Iterations summed over images; progress = steps_done / (n * calls)."""
        running = self.live_steps(self) if self.live_steps is not None and self.rows_running else 0
        return self.steps_banked + running

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self.steps_banked = value - (self.steps_done - self.steps_banked)

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def chain(self) -> ChainSpec:
        return self.request.chain

    @property
    def steps(self) -> int:
        return self.chain.steps

    @property
    def calls(self) -> int:
        """Iterations (U-Net calls) per image: the steps, plus RePaint's resampling."""
        return self.chain.unet_calls

    @property
    def deadline(self) -> float:
        """When the request times out (504): DDPM_REQUEST_TIMEOUT_S after arrival."""
        return self.created + self.timeout_s

    @property
    def due(self) -> float | None:
        """When the images must be done (monotonic seconds): ``deadline_s`` after arrival, less the time the
        answer takes after them (``reserve_s``). The scheduler's slack and admission control plan with it."""
        return None if self.deadline_s is None else self.created + self.deadline_s - self.reserve_s

    @property
    def row_calls(self) -> int:
        """U-Net row-calls per image: its chain's calls, twice for a guided image (a null-label row too)."""
        return self.request.row_calls

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def progress(self) -> float:
        return self.steps_done / (self.n * self.calls)

    @property
    def queue_wait(self) -> float | None:
        return None if self.first_admitted is None else self.first_admitted - self.created

    def cancel(self) -> None:
        """Ask the engine to drop this job's samples at its next iteration (thread-safe)."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)
