"""Whether the engine works: an iteration that fails marks it unhealthy (readiness says so), the next
one that succeeds heals it, and an idle unhealthy engine tests itself with exponential backoff, so
readiness heals without traffic. The self-test itself is the engine's (it runs the engine's stages)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("ddpm.engine")


class Health:
    def __init__(self, backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        self.healthy = True
        self.self_tests = 0
        self._first, self._max = backoff_s
        self._backoff = self._first
        self._next_self_test = 0.0

    def failed(self) -> None:
        """A stage of an iteration raised: unhealthy, first self-test after the first backoff."""
        if self.healthy:
            self.healthy = False
            self._backoff = self._first
            self._next_self_test = time.monotonic() + self._backoff

    def healed(self, why: str) -> None:
        if not self.healthy:
            log.info("engine healthy again: %s", why)
        self.healthy = True
        self._backoff = self._first

    def self_test_due(self) -> bool:
        return not self.healthy and time.monotonic() >= self._next_self_test

    def self_test_failed(self, exc: BaseException) -> None:
        self._backoff = min(self._backoff * 2, self._max)
        self._next_self_test = time.monotonic() + self._backoff
        log.warning("self-test failed; next in %.1f s", self._backoff, extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
