"""What each client has queued or running: images (DDPM_MAX_IMAGES_PER_CLIENT) and U-Net row-calls
(DDPM_MAX_CALLS_PER_CLIENT, issue 37: a few huge requests cost as much as many small ones); 429 beyond."""

from __future__ import annotations

import threading


class ClientQuota:
    def __init__(self, limit: int, calls_limit: int | None = None) -> None:
        self.limit = limit
        self.calls_limit = calls_limit
        self._held: dict[str, tuple[int, int]] = {}  # client -> (images, calls)
        self._lock = threading.Lock()

    def acquire(self, client: str, n: int, calls: int = 0) -> str | None:
        """Take ``n`` images costing ``calls`` for ``client``; None when granted, else what is over its limit."""
        with self._lock:
            images, held_calls = self._held.get(client, (0, 0))
            if images + n > self.limit:
                return f"images (limit {self.limit})"
            if self.calls_limit is not None and held_calls + calls > self.calls_limit:
                return f"U-Net row-calls (limit {self.calls_limit})"
            self._held[client] = (images + n, held_calls + calls)
            return None

    def release(self, client: str, n: int, calls: int = 0) -> None:
        with self._lock:
            images, held_calls = self._held.get(client, (0, 0))
            images, held_calls = images - n, held_calls - calls
            if images > 0 or held_calls > 0:
                self._held[client] = (max(images, 0), max(held_calls, 0))
            else:
                self._held.pop(client, None)

    def held(self, client: str) -> int:
        return self._held.get(client, (0, 0))[0]
