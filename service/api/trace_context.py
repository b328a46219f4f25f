"""W3C Trace Context's ``traceparent`` header (https://www.w3.org/TR/trace-context/ §3.2): the trace a request
belongs to, as a load balancer, a service mesh (Envoy, Istio, Linkerd) or a traced client sends it. The access log
carries its ``trace_id`` and the caller's span (``parent_id``), so this server's lines join the rest of a trace in
Loki, Tempo or Jaeger; with ``DDPM_OTLP_TRACES_ENDPOINT`` the request's own span is that span's child
(``service/tracing.py``). The header itself is not changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex (§3.2.2); a later version may append fields
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@dataclass(frozen=True)
class TraceParent:
    trace_id: str  # the whole trace's
    parent_id: str  # the caller's span
    flags: int = 1  # trace-flags: bit 0 "sampled" (the caller records this trace)

    def log_fields(self) -> dict[str, object]:
        return {"trace_id": self.trace_id, "parent_id": self.parent_id}


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The header's trace, or None where it is absent or invalid (§3.2.2-3.2.4: then the request starts no
    trace here): version ff, an all-zero trace-id or parent-id, upper-case hex, or version 00 with more after it."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return None
    return TraceParent(trace_id, parent_id, int(flags, 16))
