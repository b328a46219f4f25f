"""One request as the engine sees it: ``n`` images of one seed over one chain, and what became of them."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddpm.chain import ChainSpec
from service.engine.errors import EngineError


@dataclass
class Job:
    """``n`` images of seed ``seed`` over ``chain`` (sampler, steps, eta, spacing, clip: ``ddpm.chain.ChainSpec``).

    A new per-request chain setting is a field of ``ChainSpec``; what is not a chain setting (a class
    label, a guidance scale) is a field here."""

    seed: int
    n: int
    chain: ChainSpec
    timeout_s: float
    # a class-conditional model's label per image (None: unconditional, the null label) and the
    # classifier-free guidance scale w of every image (0: no guidance, one U-Net row per step)
    class_labels: tuple[int, ...] | None = None
    guidance_scale: float = 0.0
    # editing (ddpm/editing.py): the input image, (C, H, W) float32 in [-1, 1] (SDEdit starts from it, RePaint
    # keeps its known pixels), and RePaint's mask, (C, H, W) float32, 1 where a pixel is known
    init_image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    client: str = ""  # who the job counts against: admission is round robin over clients
    # scheduling (issue 37): a lower priority value is served first (vLLM's convention); deadline_s: seconds
    # from arrival by which the answer is wanted (None: none; the request's timeout still applies)
    priority: int = 0
    deadline_s: float | None = None
    # a job without a deadline: when it should be done to have run at most ``max_slowdown`` x its time alone
    # (set by the engine on arrival from its cost model; the scheduler keeps iterations short enough for it)
    soft_due: float | None = None
    request_id: str | None = None  # for the log lines of faults
    on_progress: Callable[[Job], None] | None = None
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
        """When the answer is wanted (monotonic seconds), from ``deadline_s``: the scheduler's slack."""
        return None if self.deadline_s is None else self.created + self.deadline_s

    @property
    def row_calls(self) -> int:
        """U-Net row-calls per image: its chain's calls, twice for a guided image (a null-label row too)."""
        return self.calls * (2 if self.guidance_scale else 1)

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def progress(self) -> float:
        return self.steps_done / (self.n * self.calls)

    @property
    def queue_wait(self) -> float | None:
        return None if self.first_admitted is None else self.first_admitted - self.created

    def check_inputs(self, shape: tuple[int, ...]) -> None:
        """The inputs the chain needs, of the model's image shape (ValueError otherwise)."""
        if self.chain.edits and self.init_image is None:
            raise ValueError("an editing chain (strength < 1 or a mask) needs an input image")
        if self.chain.repaint != (self.mask is not None):
            raise ValueError("a mask and a RePaint chain go together")
        for name, t in (("input image", self.init_image), ("mask", self.mask)):
            if t is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(f"the {name} is {tuple(t.shape)}, the model's images are {tuple(shape)}")

    def cancel(self) -> None:
        """Ask the engine to drop this job's samples at its next iteration (thread-safe)."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)
