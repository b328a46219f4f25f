"""Request spans to an OpenTelemetry collector: ``DDPM_OTLP_TRACES_ENDPOINT`` (OTLP over HTTP, as vLLM's
``--otlp-traces-endpoint`` and TGI's), with the ``[otel]`` extra (opentelemetry-sdk and its OTLP/HTTP exporter).

One server span per request other than the probes and the scrapes (``POST /generate``: method, path, status, the
request id and the access line's fields), child of the caller's span where a valid ``traceparent`` came with it (its
sampled flag honoured), and for a generation request three children made from the engine's own clock: ``queue``
(arrival to the job's first iteration), ``denoise`` (to its last) and ``answer`` (encoding and writing). They are
recorded when the request ends, with the times it had, so nothing on the request's path waits on tracing; the SDK's
batch processor exports them from its own thread (``OTEL_BSP_*``; the other ``OTEL_*`` variables, the service name,
headers, sampler and resource attributes among them, as the SDK reads them). Unset: no span, nothing imported.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ddpm.server")
FLUSH_TIMEOUT_MS = 2000  # at shutdown: what is left is sent within this, or dropped (a collector that is down)
SPAN_FIELDS = ("request_id", "seed", "batch_size", "steps", "sampler", "first_image", "cache", "user", "api")  # the access line's


class RequestTracer:
    """Spans of finished requests, from the times the request context measured (``time.monotonic``)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.tracer = provider.get_tracer("ddpm-serve")
        self._trace = trace

    def record(self, method: str, path: str, status: int, outcome: str, arrived: float, fields: dict[str, Any],
               parent: Any = None, job: Any = None) -> None:  # fmt: skip
        """The request's span (arrived until now) and, where ``job`` made its images, its phases as children."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        now_ns, now = time.time_ns(), time.monotonic()

        def wall(t: float) -> int:
            return now_ns - int((now - t) * 1e9)

        attributes = {"http.request.method": method, "url.path": path, "http.response.status_code": status, "ddpm.outcome": outcome}
        attributes |= {f"ddpm.{k}": v for k, v in fields.items() if k in SPAN_FIELDS and v is not None}
        span = self.tracer.start_span(f"{method} {path}", context=_remote(parent), kind=SpanKind.SERVER, attributes=attributes,
                                      start_time=wall(arrived))  # fmt: skip
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, outcome))
        for name, start, end in _phases(job, arrived, now):
            self.tracer.start_span(name, context=self._trace.set_span_in_context(span), start_time=wall(start)).end(end_time=wall(end))
        span.end(end_time=now_ns)

    def flush(self) -> None:
        """Send what is left, for FLUSH_TIMEOUT_MS at most: the SDK's own flush (1.45) ignores its timeout and waits for
        the exporter's retries (10 s), so a collector that was down held the stop 8.5 s instead of ~1 s (measured); the
        flush runs in a thread of its own, let go of at the bound (what it had not sent is lost, as on a kill)."""
        flushing = threading.Thread(target=self.provider.force_flush, args=(FLUSH_TIMEOUT_MS,), name="ddpm-trace-flush", daemon=True)
        flushing.start()
        flushing.join(FLUSH_TIMEOUT_MS / 1000)


def _remote(parent: Any) -> Any:
    """The caller's span (a parsed ``traceparent``) as the context to start under; None: a new trace."""
    if parent is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    caller = SpanContext(int(parent.trace_id, 16), int(parent.parent_id, 16), is_remote=True, trace_flags=TraceFlags(parent.flags))
    return trace.set_span_in_context(NonRecordingSpan(caller))


def _phases(job: Any, arrived: float, now: float) -> list[tuple[str, float, float]]:
    """queue, denoise, answer: the job's clock within this request's (a shared job may have begun before it)."""
    if job is None or job.first_admitted is None or job.finished is None:
        return []
    started = min(max(job.first_admitted, arrived), now)
    finished = min(max(job.finished, started), now)
    return [("queue", arrived, started), ("denoise", started, finished), ("answer", finished, now)]


def request_tracer(endpoint: str | None, exporter: Any = None, on_result: Callable[[bool, int], None] | None = None,
                   ) -> RequestTracer | None:  # fmt: skip
    """The tracer ``endpoint`` asks for (None: tracing off); ValueError where the ``[otel]`` extra is missing.
    ``exporter``: another span exporter than OTLP over HTTP (the tests' in-memory one). Either is watched
    (``service.trace_export_watch``): a collector that stops taking spans is said once, and ``on_result(exported,
    spans)`` counts each batch."""
    if endpoint is None and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from service.trace_export_watch import WatchedExporter

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ValueError(
            f"DDPM_OTLP_TRACES_ENDPOINT is set but OpenTelemetry is not installed ({exc.name}): pip install 'ddpm-serve[otel]'"
        ) from None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "ddpm-serve"})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # flushed by the server's shutdown, bounded
    if exporter is None:
        provider.add_span_processor(BatchSpanProcessor(WatchedExporter(OTLPSpanExporter(endpoint=endpoint), str(endpoint), on_result)))
        log.info("traces: a span per request to %s (OTLP over HTTP)", endpoint)
    else:
        provider.add_span_processor(SimpleSpanProcessor(WatchedExporter(exporter, endpoint or type(exporter).__name__, on_result)))
    return RequestTracer(provider)
