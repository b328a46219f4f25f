"""A bounded in-memory cache of finished images, and the ETags that name them.

Image k of a request is a pure function of (the model's fingerprint: weights, every config file, the
maths resolved from them and the code version, ``ddpm.model_facts.model_fingerprint``; the U-Net's
precision and device type; seed, k,
the chain: sampler, steps, eta, timestep spacing and offset, clip; and for a class-conditional model
its label and the guidance scale; for an edit, its input image and mask). A request is (seed, n, chain)
and asks for images k = first..first+n-1 (first: 0 unless it says), so identical requests get identical images: the second one is
answered from here without a U-Net call, and a client that sends the ETag it got back in
``If-None-Match`` gets 304 without even the encoding. (Triton Inference Server's response cache is
the same idea, keyed on the request's inputs.)

The ETag depends only on the key and the media type, not on what is cached: a replica with the same
fingerprint, precision and device type names the same answer with the same ETag, and a replica with
another config, schedule or code version names it differently. ``If-None-Match: *`` is RFC 9110's
"any current representation": it matches only an answer this replica holds in its cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ddpm.image_request import ImageRequest


@dataclass(frozen=True)
class ImageKey:
    """The request's images on this replica's model, precision and device type."""

    model_fingerprint: str
    precision: str
    device_type: str
    request: ImageRequest

    def etag(self, media_type: str) -> str:
        r, c = self.request, self.request.chain
        parts = (self.model_fingerprint, self.precision, self.device_type, r.seed, r.n, c.sampler, c.steps, repr(c.eta), c.clip,
                 c.spacing, c.steps_offset, r.labels, repr(r.guidance_scale), media_type)  # fmt: skip
        if r.edit is not None:  # an edit's chain and input (plain answers keep their ETags)
            parts += (repr(c.strength), c.repaint, c.jump_length, c.jump_n_sample, r.edit.sha256)
        if r.first:  # images from k = first on (those from 0 keep their ETags)
            parts += ("first", r.first)
        return '"' + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32] + '"'


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
    """LRU over finished image tensors, bounded in bytes (0: off; ``entry_bytes`` per entry). Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[ImageKey, torch.Tensor] = OrderedDict()
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
        with self._lock:
            return key in self._items

    def get(self, key: ImageKey) -> torch.Tensor | None:
        with self._lock:
            images = self._items.get(key)
            if images is not None:
                self._items.move_to_end(key)
            return images

    def put(self, key: ImageKey, images: torch.Tensor) -> None:
        if images.untyped_storage().nbytes() != images.numel() * images.element_size():
            images = images.clone()  # a view into something larger would hold all of it
        size = entry_bytes(images)
        if size > self.max_bytes:
            return  # larger than the whole cache (or the cache is off)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= entry_bytes(old)
            self._items[key] = images
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= entry_bytes(evicted)
