"""Images each client has queued or running, bounded by DDPM_MAX_IMAGES_PER_CLIENT (429 beyond it)."""

from __future__ import annotations

import threading


class ClientQuota:
    """Images each client has queued or running, bounded by DDPM_MAX_IMAGES_PER_CLIENT."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str, n: int) -> bool:
        with self._lock:
            held = self._held.get(client, 0)
            if held + n > self.limit:
                return False
            self._held[client] = held + n
            return True

    def release(self, client: str, n: int) -> None:
        with self._lock:
            left = self._held.get(client, 0) - n
            if left > 0:
                self._held[client] = left
            else:
                self._held.pop(client, None)

    def held(self, client: str) -> int:
        return self._held.get(client, 0)
