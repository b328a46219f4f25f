"""The span exporter watched: a collector that stops taking spans said once, its recovery said once, and every span
counted as exported or dropped (``ddpm_trace_spans_total{result}``).

The OpenTelemetry SDK's OTLP exporter logs each failed try itself: a collector that was down wrote four warnings of
~400 characters every ~11 s while requests came (three "Transient error ... Max retries exceeded ..." and one "Failed to
export spans batch"; measured, stop 75), ~1,300 lines an hour that said the same thing, and nothing when it came back.
Its records are kept from the log here (the latest one's message becomes the reason of the one line said), and the
watch says the state changes: "traces: the collector at URL takes no spans (reason): they are dropped until it does",
then "traces: the collector at URL takes spans again; N spans were dropped meanwhile".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("ddpm.server")
SDK_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry.exporter.otlp.proto.http")


class _LatestReason(logging.Filter):
    """Keeps the SDK exporter's records out of the log, remembering what the latest batch's said: its last warning (the
    cause: "Transient error ... Max retries exceeded ... Connection refused"), else its error (with a short timeout
    there is no retry to warn of, only "Failed to export span batch due to timeout, max retries or shutdown.")."""

    def __init__(self) -> None:
        super().__init__()
        self.warning: str | None = None
        self.error: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = " ".join(record.getMessage().split())[:300]
        if record.levelno == logging.WARNING:
            self.warning = message
        elif record.levelno > logging.WARNING:
            self.error = message
        return False

    def forget(self) -> None:
        self.warning = self.error = None

    @property
    def latest(self) -> str | None:
        return self.warning or self.error


REASON = _LatestReason()  # one for the process: a logger's filters stop at the first that refuses a record


class WatchedExporter(SpanExporter):
    """``exporter``'s results said at their changes and counted (``on_result(exported: bool, spans)``)."""

    def __init__(self, exporter: SpanExporter, where: str, on_result: Callable[[bool, int], None] | None = None) -> None:
        self.exporter, self.where, self.on_result = exporter, where, on_result
        for name in SDK_EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(REASON)  # once: a filter there already is not added again
        self._lock = threading.Lock()
        self.failing = False
        self.dropped_since = 0  # spans dropped since the collector stopped taking them

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        REASON.forget()  # one batch at a time: the SDK's batch processor exports from its one thread
        result = self.exporter.export(spans)
        exported = result is SpanExportResult.SUCCESS
        if self.on_result is not None:
            self.on_result(exported, len(spans))
        with self._lock:
            if not exported:
                if not self.failing:
                    log.warning("traces: the collector at %s takes no spans (%s): they are dropped until it does", self.where,
                                REASON.latest or "the exporter gave no reason")  # fmt: skip
                self.failing, self.dropped_since = True, self.dropped_since + len(spans)
            elif self.failing:
                log.info("traces: the collector at %s takes spans again; %d spans were dropped meanwhile", self.where, self.dropped_since)
                self.failing, self.dropped_since = False, 0
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
