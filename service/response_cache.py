"""A bounded in-memory cache of finished images, and the ETags that name them.

Image k of a request is a pure function of (the model's fingerprint: weights, every config file, the
maths resolved from them and the code version, ``ddpm.model_facts.model_fingerprint``; the U-Net's
precision and device type; seed, k,
the chain: sampler, steps, eta, timestep spacing and offset, clip; and for a class-conditional model
its label and the guidance scale; for an edit, its input image and mask). A request is (seed, n, chain)
and asks for images k = first..first+n-1 (first: 0 unless it says), so identical requests get identical images: the second one is
answered from here without a U-Net call, and a client that sends the ETag it got back in
``If-None-Match`` gets 304 without even the encoding. (Triton Inference Server's response cache is
the same idea, keyed on the request's inputs.) A request for part of held answers' images (images 10..19 of
a seed while 0..63 are held; 60..69 while 0..63 and 64..127 are) is answered from them too.

The ETag depends only on the key and the media type, not on what is cached: a replica with the same
fingerprint, precision and device type names the same answer with the same ETag, and a replica with
another config, schedule or code version names it differently. ``If-None-Match: *`` is RFC 9110's
"any current representation": it matches only an answer this replica holds in its cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from ddpm.image_request import ImageRequest


@dataclass(frozen=True)
class ImageKey:
    """The request's images on this replica's model, precision and device type."""

    model_fingerprint: str
    precision: str
    device_type: str
    request: ImageRequest

    @property
    def family(self) -> ImageKey:
        """The key without its range of images (first, n and their labels): requests for any images of one seed,
        chain and input share it."""
        return replace(self, request=replace(self.request, n=0, first=0, labels=None))

    def etag(self, media_type: str) -> str:
        r, c = self.request, self.request.chain
        parts = (self.model_fingerprint, self.precision, self.device_type, r.seed, r.n, c.sampler, c.steps, repr(c.eta), c.clip,
                 c.spacing, c.steps_offset, r.labels, repr(r.guidance_scale), media_type)  # fmt: skip
        if r.edit is not None:  # an edit's chain and input (plain answers keep their ETags)
            parts += (repr(c.strength), c.repaint, c.jump_length, c.jump_n_sample, r.edit.sha256)
        if r.first:  # images from k = first on (those from 0 keep their ETags)
            parts += ("first", r.first)
        return '"' + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32] + '"'


def _same_labels(asked: ImageRequest, held: ImageRequest, k: int, count: int) -> bool:
    """Whether images k..k+count-1 have the same labels in both requests (a class-conditional model's; None: none)."""

    def labels(r: ImageRequest) -> tuple[int, ...] | None:
        return None if r.labels is None else r.labels[k - r.first : k - r.first + count]

    return labels(asked) == labels(held)


def range_offset(mine: ImageRequest, theirs: ImageRequest) -> int | None:
    """Where ``mine``'s images lie among ``theirs``' (of one family: ``ImageKey.family``), or None unless all are there."""
    offset = mine.first - theirs.first
    if offset < 0 or offset + mine.n > theirs.n or not _same_labels(mine, theirs, mine.first, mine.n):
        return None
    return offset


def etag_matches(if_none_match: str | None, etag: str, held: bool) -> bool:
    """RFC 9110 §13.1.2: weak comparison against each listed entity tag; ``*`` matches when the server
    has a current representation (``held``: this replica's cache has the answer), not merely because
    the images could be computed."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return ("*" in tags and held) or etag in (t.removeprefix("W/") for t in tags)


# What one entry costs besides its pixels: the key (ImageKey, ChainSpec, strings), the tensor object and
# the LRU's node, measured by benchmarks/bench_response_cache_memory.py (process RSS per entry with
# 1-image entries, where this part dominates: ~1.26 KiB on CPython 3.11 + torch 2.13)
ENTRY_OVERHEAD_BYTES = 1280


def entry_bytes(images: torch.Tensor) -> int:
    """The memory an entry holds: the images' whole storage (not only the view's elements) and the
    bookkeeping around it."""
    return images.untyped_storage().nbytes() + ENTRY_OVERHEAD_BYTES


class ResponseCache:
    """LRU over finished image tensors, bounded in bytes (0: off; ``entry_bytes`` per entry). Thread-safe.
    A key is answered by its own entry, else by slices of the entries that hold its images (``_pieces``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[ImageKey, torch.Tensor] = OrderedDict()
        # the keys held by family, then by their first image: where a part of a request is found, looking only at
        # the entries that start at most ``_longest - 1`` images before it (not at every entry of a seed)
        self._starts: dict[ImageKey, dict[int, set[ImageKey]]] = {}
        self._longest = 0  # the most images an entry has held
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, ImageKey):
            return False
        with self._lock:
            return self._pieces(key) is not None

    def get(self, key: ImageKey) -> torch.Tensor | None:
        with self._lock:
            pieces = self._pieces(key)
            if pieces is None:
                return None
            for holder, _, _ in pieces:
                self._items.move_to_end(holder)
            if len(pieces) == 1:
                holder, offset, count = pieces[0]
                images = self._items[holder]
                return images if holder == key else images[offset : offset + count]
            return torch.cat([self._items[holder][offset : offset + count] for holder, offset, count in pieces])

    def _pieces(self, key: ImageKey) -> list[tuple[ImageKey, int, int]] | None:
        """The entries that hold ``key``'s images, in order: (entry, where its part starts in it, how many images), each
        reaching as far as any entry does (images 60..69 from 0..63 and 64..127); None if one is missing (the lock held)."""
        if key in self._items:
            return [(key, 0, key.request.n)]
        starts = self._starts.get(key.family)
        if starts is None:
            return None
        asked, pieces = key.request, []
        k, end = asked.first, asked.first + asked.n
        while k < end:
            best: tuple[ImageKey, int, int] | None = None
            for start in range(k, max(k - self._longest, -1), -1):  # the entries that can hold image k
                for holder in starts.get(start, ()):
                    held = holder.request
                    count = min(held.first + held.n, end) - k
                    if count > 0 and (best is None or count > best[2]) and _same_labels(asked, held, k, count):
                        best = (holder, k - held.first, count)
            if best is None:
                return None
            pieces.append(best)
            k += best[2]
        return pieces

    def put(self, key: ImageKey, images: torch.Tensor) -> None:
        if images.untyped_storage().nbytes() != images.numel() * images.element_size():
            images = images.clone()  # a view into something larger would hold all of it
        size = entry_bytes(images)
        if size > self.max_bytes:
            return  # larger than the whole cache (or the cache is off)
        with self._lock:
            self._drop(key)
            self._items[key] = images
            self._starts.setdefault(key.family, {}).setdefault(key.request.first, set()).add(key)
            self._longest = max(self._longest, key.request.n)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: ImageKey) -> None:
        """Forget ``key``'s entry if held (the lock held)."""
        images = self._items.pop(key, None)
        if images is None:
            return
        self._bytes -= entry_bytes(images)
        family = self._starts[key.family]
        keys = family[key.request.first]
        keys.discard(key)
        if not keys:
            del family[key.request.first]
            if not family:
                del self._starts[key.family]
