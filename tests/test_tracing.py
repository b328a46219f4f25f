"""A span per request to an OpenTelemetry collector (DDPM_OTLP_TRACES_ENDPOINT, service/tracing.py): in process with
the SDK's in-memory exporter, and end to end from ``ddpm serve`` through the SDK's real OTLP/HTTP exporter to a
receiver that decodes what it was sent with OpenTelemetry's own protobuf classes."""

from __future__ import annotations

import http.server
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

pytest.importorskip("opentelemetry.sdk.trace", reason="the [otel] extra")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.tracing import request_tracer
from tests.app_client import wait_ready
from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model

TRACE_ID, CALLER = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=50)


def traced_app(model: Path) -> tuple[TestClient, InMemorySpanExporter]:
    """The app in process, its spans kept in memory (the tracer set before the app is made, as DDPM_OTLP_TRACES_ENDPOINT's)."""
    from service.api.app import create_app
    from service.server_state import ServerState
    from service.settings import Settings

    settings = Settings(model=str(model), warmup_steps=1, max_batch=8, compile="off")
    state, exporter = ServerState(settings), InMemorySpanExporter()
    state.tracer = request_tracer(None, exporter=exporter)
    return TestClient(create_app(settings, state)), exporter


def test_a_generation_is_a_server_span_under_the_callers_with_its_phases(tiny: Path) -> None:
    client, exporter = traced_app(tiny)
    with client:
        wait_ready(client)
        client.get("/healthz")  # probes and scrapes make no span
        answer = client.post("/generate", json={"seed": 4, "batch_size": 2, "steps": 3},
                             headers={"traceparent": f"00-{TRACE_ID}-{CALLER}-01", "X-Request-ID": "req-7"})  # fmt: skip
        assert answer.status_code == 200
        client.post("/generate", json={"seed": 4, "batch_size": 2, "steps": 3})  # the same: from the response cache
        client.post("/generate", json={"seed": -1})  # 422
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind.name == "SERVER"]
    assert [s.name for s in servers] == ["POST /generate"] * 3
    first, cached, refused = servers
    assert f"{first.context.trace_id:032x}" == TRACE_ID and f"{first.parent.span_id:016x}" == CALLER and first.parent.is_remote
    assert first.attributes["http.response.status_code"] == 200 and first.attributes["ddpm.request_id"] == "req-7"
    assert (first.attributes["ddpm.seed"], first.attributes["ddpm.batch_size"], first.attributes["ddpm.cache"]) == (4, 2, "miss")
    phases = sorted((s for s in spans if s.parent is not None and s.parent.span_id == first.context.span_id), key=lambda s: s.start_time)
    assert [s.name for s in phases] == ["queue", "denoise", "answer"]
    assert first.start_time == phases[0].start_time and phases[-1].end_time == first.end_time
    assert all(a.end_time == b.start_time for a, b in itertools.pairwise(phases))  # one after another, no gap
    assert phases[1].end_time > phases[1].start_time  # the U-Net calls took time
    assert cached.attributes["ddpm.cache"] == "hit" and cached.parent is None  # no traceparent: a trace of its own
    assert not [s for s in spans if s.parent is not None and s.parent.span_id == cached.context.span_id]  # no job: no phases
    assert refused.attributes["http.response.status_code"] == 422 and refused.status.is_ok


def test_an_unsampled_caller_is_not_recorded(tiny: Path) -> None:
    client, exporter = traced_app(tiny)
    with client:
        wait_ready(client)
        assert client.get("/schedule", headers={"traceparent": f"00-{TRACE_ID}-{CALLER}-00"}).status_code == 200
        assert client.get("/schedule", headers={"traceparent": f"00-{TRACE_ID}-{CALLER}-01"}).status_code == 200
    assert [f"{s.parent.span_id:016x}" for s in exporter.get_finished_spans()] == [CALLER]  # only the sampled one


def test_without_the_extra_the_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if opentelemetry-sdk were not installed
    with pytest.raises(ValueError, match=r"DDPM_OTLP_TRACES_ENDPOINT is set but OpenTelemetry is not installed .*ddpm-serve\[otel\]"):
        request_tracer("http://collector:4318/v1/traces")
    assert request_tracer(None) is None  # off: nothing imported, nothing asked


@pytest.mark.parametrize("endpoint", ["http:///v1/traces", "http://:4318/v1/traces", "ftp://collector/v1/traces", "collector:4318", ""])
def test_an_endpoint_that_is_no_http_url_is_refused(endpoint: str) -> None:
    """A URL without a host (a value templated empty), another scheme: refused at start (the check compared lengths
    before: a host-less URL passed it, a one-letter host did not)."""
    from service.settings import Settings

    with pytest.raises(ValueError, match="is not an http:// or https:// URL"):
        Settings(otlp_traces_endpoint=endpoint)
    assert Settings(otlp_traces_endpoint="http://c/v1/traces").otlp_traces_endpoint == "http://c/v1/traces"


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        _Collector.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.received = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/traces"
    httpd.shutdown()
    httpd.server_close()


def test_ddpm_serve_sends_its_spans_over_otlp_http(tiny: Path, collector: str) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    s = ServerProcess(tiny, DDPM_OTLP_TRACES_ENDPOINT=collector, OTEL_BSP_SCHEDULE_DELAY="100", OTEL_SERVICE_NAME="ddpm-test",
                      DDPM_COMPILE="off")  # fmt: skip
    try:
        s.wait_ready()
        answer = httpx.post(s.url + "/generate", json={"seed": 1, "steps": 2}, headers={"traceparent": f"00-{TRACE_ID}-{CALLER}-01"},
                            timeout=30)  # fmt: skip
        assert answer.status_code == 200
        end = time.monotonic() + 10
        spans: list = []
        while len(spans) < 4:
            assert time.monotonic() < end, (len(spans), s.output()[-2000:])
            time.sleep(0.05)
            batches = [ExportTraceServiceRequest.FromString(body) for body in list(_Collector.received)]
            spans = [(rs, sp) for b in batches for rs in b.resource_spans for ss in rs.scope_spans for sp in ss.spans]
        output = s.output()
    finally:
        s.stop()
    resource = {a.key: a.value.string_value for a in spans[0][0].resource.attributes}
    assert resource["service.name"] == "ddpm-test"
    by_name = {sp.name: sp for _, sp in spans}
    assert set(by_name) == {"POST /generate", "queue", "denoise", "answer"}
    server = by_name["POST /generate"]
    assert server.trace_id.hex() == TRACE_ID and server.parent_span_id.hex() == CALLER
    assert all(by_name[p].parent_span_id == server.span_id for p in ("queue", "denoise", "answer"))
    assert "traces: a span per request to " + collector in output


def test_a_collector_that_is_down_costs_no_answer_and_a_bounded_stop(tiny: Path) -> None:
    """Spans to a port nothing listens on: the requests are answered as without tracing (the SDK's exporter retries in
    its own thread and logs its failures), and SIGTERM's exit waits at most the 2 s flush bound for them (8.5 s before:
    the SDK's flush ignores its timeout and waits for the exporter's retries)."""
    import signal

    s = ServerProcess(tiny, DDPM_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces", DDPM_COMPILE="off")
    try:
        s.wait_ready()
        for seed in range(3):
            assert httpx.post(s.url + "/generate", json={"seed": seed, "steps": 2}, timeout=30).status_code == 200
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert time.monotonic() - start < 6.0, s.output()[-1500:]  # the old code: 7.0 s here, 8.5 s by hand
    finally:
        s.stop()


class _Flaky:
    """A span exporter that fails its first ``failures`` batches as the SDK's OTLP one does (a warning on its logger per
    try, then FAILURE), then takes them."""

    def __init__(self, failures: int) -> None:
        self.failures, self.taken = failures, 0

    def export(self, spans: object) -> object:
        import logging

        from opentelemetry.sdk.trace.export import SpanExportResult

        if self.failures > 0:
            self.failures -= 1
            logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").warning(
                "Transient error HTTPConnectionPool(host='c', port=4318): Max retries exceeded\nwith url: /v1/traces")
            return SpanExportResult.FAILURE
        self.taken += len(spans)  # type: ignore[arg-type]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def test_a_collector_that_stops_taking_spans_is_said_once_and_its_return_too(caplog: pytest.LogCaptureFixture) -> None:
    """Three batches refused, then taken: one warning with the exporter's reason, one line when the collector takes spans
    again with the count dropped meanwhile, none of the SDK exporter's own lines (four a batch before, ~1,300 an hour
    while requests came), and each span counted by result."""
    import logging

    from service.metrics import Metrics
    from tests.prometheus_text import sample_value

    metrics, flaky = Metrics(), _Flaky(failures=3)
    tracer = request_tracer(None, exporter=flaky, on_result=metrics.on_spans_exported)
    assert tracer is not None
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            tracer.record("GET", "/schedule", 200, "ok", time.monotonic(), {})
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("WARNING", "traces: the collector at _Flaky takes no spans (Transient error HTTPConnectionPool(host='c', port=4318): Max "
                    "retries exceeded with url: /v1/traces): they are dropped until it does"),
        ("INFO", "traces: the collector at _Flaky takes spans again; 3 spans were dropped meanwhile"),
    ]  # fmt: skip
    exposition = generate_latest(metrics.registry).decode()
    assert sample_value(exposition, 'ddpm_trace_spans_total{result="dropped"}') == 3
    assert sample_value(exposition, 'ddpm_trace_spans_total{result="exported"}') == 2 == flaky.taken


def test_ddpm_serve_says_a_collector_down_once_and_up_once(tiny: Path) -> None:
    """End to end through the SDK's OTLP/HTTP exporter (a 1 s timeout a batch): the collector's port closed for a while,
    then a collector on it."""
    from tests.server_process import free_port

    port = free_port()
    s = ServerProcess(tiny, DDPM_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{port}/v1/traces", OTEL_BSP_SCHEDULE_DELAY="100",
                      OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="1", DDPM_COMPILE="off")  # fmt: skip
    httpd = None
    try:
        s.wait_ready()
        end = time.monotonic() + 20
        while s.metric('ddpm_trace_spans_total{result="dropped"}') < 3:  # batches refused, several
            assert time.monotonic() < end, s.output()[-2000:]
            httpx.get(s.url + "/schedule")
            time.sleep(0.2)
        _Collector.received = []
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Collector)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        while s.metric('ddpm_trace_spans_total{result="exported"}') < 1:
            assert time.monotonic() < end + 20, s.output()[-2000:]
            httpx.get(s.url + "/schedule")
            time.sleep(0.2)
        output = s.wait_output(lambda out: "takes spans again" in out)
    finally:
        s.stop()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
    said = f"traces: the collector at http://127.0.0.1:{port}/v1/traces takes no spans ("
    assert output.count(said) == 1 and "exporter gave no reason" not in output  # 1 s a batch: no retry, "Failed to export ..."
    assert output.count("takes spans again; ") == 1 and '"logger": "opentelemetry.exporter' not in output  # its 4 lines a batch
