"""A job's partial images (service/engine/previews.py) as the requests waiting on it read them (event-loop thread only).

Each reader (a stream: the job's own request, or one sharing the job, service/api/in_flight.py) gets every partial
image of its own images that comes after it began to read, each once, in order; one that joins a running job starts
from each image's newest. What every reader has read is let go, except each image's newest (for a reader yet to
join): the log holds at most one preview per image plus those a reader has still to read (a stalled reader: at most
the job's previews, as many as it asked for per image), not every preview until the job ends.
"""

from __future__ import annotations

import weakref

import torch

Preview = tuple[int, int, torch.Tensor]  # (image k of the job, preview index, x0_hat (C, H, W) in [-1, 1])


class PreviewLog:
    """The partial images of one job: those some reader has still to read, and each image's newest."""

    def __init__(self) -> None:
        self._entries: list[Preview] = []  # previews made - len(_entries) .. made - 1
        self.made = 0  # partial images so far
        self._newest: dict[int, Preview] = {}  # image k -> its newest: where a reader that joins later starts
        self._readers: weakref.WeakSet[PreviewReader] = weakref.WeakSet()  # a stream that ended lets go of its reader

    @property
    def held(self) -> int:
        """Previews held for readers (each image's newest apart)."""
        return len(self._entries)

    def add(self, preview: Preview) -> None:
        self._entries.append(preview)
        self.made += 1
        self._newest[preview[0]] = preview
        self.let_go()

    def reader(self, offset: int, n: int) -> PreviewReader:
        """A reader of images offset..offset+n-1 of the job (n 0: reads none), numbered from 0: first each image's
        newest preview so far, then every one that comes."""
        reader = PreviewReader(self, offset, n, sorted(self._newest.values(), key=lambda p: (p[1], p[0])))
        self._readers.add(reader)
        return reader

    def since(self, read: int) -> list[Preview]:
        """The previews from the ``read``-th on (those a reader has not read: never let go of while it lives)."""
        return self._entries[read - (self.made - len(self._entries)) :]

    def let_go(self) -> None:
        """Drop what every living reader has read (with none left: all of it; each image's newest stays apart): after
        each preview made and each read."""
        lowest = min((r.read for r in self._readers), default=self.made)
        del self._entries[: lowest - (self.made - len(self._entries))]


class PreviewReader:
    """One request's place among its job's partial images: those of its own images (``n`` from ``offset`` among the
    job's, numbered from 0), each once."""

    def __init__(self, log: PreviewLog, offset: int, n: int, first: list[Preview]) -> None:
        self._log, self._offset, self._n = log, offset, n
        self.read = log.made  # the next preview of the log's this reader has not read
        self._first = first  # each image's newest when it joined

    def take(self) -> list[Preview]:
        """The partial images that came since the last call: (image index in the request, preview index, x0_hat)."""
        came, self._first = [*self._first, *self._log.since(self.read)], []
        self.read = self._log.made
        self._log.let_go()
        first, end = self._offset, self._offset + self._n
        return [(k - first, index, image) for k, index, image in came if first <= k < end]
