"""Testing aid: make chosen stages of the serving path raise, to prove that a fault costs only the
requests it touched (``DDPM_FAULT_*`` settings; all off by default).

Stages (where the engine and the routes call the injector):
  admit     drawing x_T for samples joining the running batch
  unet      the eps_theta call over the running batch
  step      the fused reverse step
  advance   moving samples on, retiring finished images
  observer  a metrics hook (isolated: logged and counted, the jobs still succeed)
  encode    turning a finished job's images into PNG / npy (in the HTTP layer)
  loop      the engine thread's own loop, outside any iteration: kills the engine (exit non-zero)

and ``stall_s``: the first U-Net call after arming blocks that long, as a hung device call would (the
stall watchdog's test: ``DDPM_STALL_TIMEOUT_S``).
"""

from __future__ import annotations

import random
import threading
import time

STAGES = ("admit", "unet", "step", "advance", "observer", "encode", "loop")


def check_stages(stages: tuple[str, ...]) -> tuple[str, ...]:
    """``stages`` if every one is known, else ValueError naming the unknown ones."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown fault stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    return stages


class InjectedFault(RuntimeError):
    """Raised by the injector; never raised in production (the injector is absent)."""


class FaultInjector:
    """Raises ``InjectedFault`` at a stage: every ``every_n``-th U-Net call, and at each listed stage
    with probability ``rate`` (seeded), while ``duration_s`` (0: forever) has not passed since ``arm()``."""

    def __init__(
        self,
        *,
        every_n: int = 0,
        rate: float = 0.0,
        stages: tuple[str, ...] = (),
        seed: int = 0,
        duration_s: float = 0.0,
        stall_s: float = 0.0,
    ) -> None:
        self.every_n = every_n
        self.rate = rate
        self.stages = frozenset(check_stages(stages))
        self.duration_s = duration_s
        self.stall_s = stall_s
        self._stalled = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._armed_at: float | None = None
        self.unet_calls = 0
        self.raised: dict[str, int] = {}
        self.last_raised: float | None = None  # monotonic time of the last fault

    @property
    def enabled(self) -> bool:
        return self.every_n > 0 or (self.rate > 0 and bool(self.stages)) or self.stall_s > 0

    def arm(self) -> None:
        """Start injecting (the server arms it after warm-up, so start-up itself never fails)."""
        self._armed_at = time.monotonic()

    def __call__(self, stage: str) -> None:
        if self._armed_at is None:
            return
        if stage == "unet" and self.stall_s > 0 and not self._stalled:
            self._stalled = True
            time.sleep(self.stall_s)  # blocks, raises nothing: only the watchdog can tell
        with self._lock:
            if self.duration_s and time.monotonic() - self._armed_at > self.duration_s:
                return
            hit = False
            if stage == "unet" and self.every_n:
                self.unet_calls += 1
                hit = self.unet_calls % self.every_n == 0
            if not hit and stage in self.stages and self.rate > 0:
                hit = self._rng.random() < self.rate
            if not hit:
                return
            self.raised[stage] = self.raised.get(stage, 0) + 1
            self.last_raised = time.monotonic()
        raise InjectedFault(f"injected fault at stage {stage}")
