"""Proactive content negotiation on ``Accept`` (RFC 9110 §12.5.1): media ranges with q-values,
case-insensitive, the most specific matching range deciding each offered type's weight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MediaRange:
    type: str  # "*" allowed
    subtype: str  # "*" allowed
    q: float

    def matches(self, media: str) -> bool:
        t, _, s = media.partition("/")
        return (self.type in ("*", t)) and (self.subtype in ("*", s))

    @property
    def specificity(self) -> int:
        return (self.type != "*") + (self.subtype != "*")


def parse_accept(header: str) -> list[MediaRange]:
    """The valid media ranges of an Accept header; malformed ones are skipped."""
    ranges = []
    for part in header.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        t, slash, s = media.lower().partition("/")
        if not slash or not t or not s or (t == "*" and s != "*"):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 <= q <= 1.0:
            ranges.append(MediaRange(t, s, q))
    return ranges


def negotiate(accept: str | None, offered: Sequence[str]) -> str | None:
    """The offered type the client prefers (ties: the server's order), or None when the client
    accepts none of them (406). No Accept header, or one with no valid range, accepts anything."""
    ranges = parse_accept(accept) if accept and accept.strip() else []
    if not ranges:
        return offered[0]
    best, best_q = None, 0.0
    for media in offered:
        matching = [r for r in ranges if r.matches(media.lower())]
        if not matching:
            continue
        q = max(matching, key=lambda r: r.specificity).q
        if q > best_q:
            best, best_q = media, q
    return best
