"""Every response is logged and counted with its real outcome: text logs keep the fields, a stream's
access line carries how it ended, refusals before routing are counted, an unhandled error is a JSON 500
with the request id."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.request_log import JsonFormatter, TextFormatter
from service.server_state import ServerState
from tests.app_client import app_and_state
from tests.app_client import metric as _metric
from tests.app_client import wait_ready as _ready


def test_text_log_format_keeps_every_field() -> None:
    record = logging.LogRecord("ddpm.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "abc", "status": 200, "path": "/generate", "duration_s": 0.5}  # type: ignore[attr-defined]
    line = TextFormatter().format(record)
    assert line.endswith('INFO ddpm.access request request_id="abc" status=200 path="/generate" duration_s=0.5'), line


def test_stream_outcome_in_the_access_log(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from service.engine.iteration_cost import IterationCost

    c, state = app_and_state(model_dir, request_timeout_s=0.2)
    with c, caplog.at_level(logging.INFO, logger="ddpm.access"):
        _ready(c)
        assert state.engine is not None
        state.engine.cost = IterationCost()  # nothing measured: not refused up front as outlasting its timeout (test_scheduling.py)
        with c.stream("POST", "/generate/stream", json={"seed": 1, "batch_size": 4, "steps": 200}) as r:
            text = "".join(r.iter_text())
        assert r.status_code == 200 and "event: error" in text and '"status": 504' in text
        line = next(json.loads(JsonFormatter().format(x)) for x in caplog.records if x.name == "ddpm.access")
        assert (line["status"], line["http_status"], line["outcome"]) == (504, 200, "timeout")
        assert _metric(c, 'ddpm_requests_total{code="504"}') == 1


def test_every_response_is_counted(model_dir: Path) -> None:
    c, _ = app_and_state(model_dir, api_token="t0ken", max_body_bytes=256)
    with c:
        _ready(c)
        assert c.post("/generate", json={"seed": 1}).status_code == 401
        assert c.post("/generate", content=b"x" * 300, headers={"Content-Type": "application/json"}).status_code == 413
        assert c.get("/nope").status_code == 404
        assert _metric(c, 'ddpm_requests_total{code="401"}') == 1 and _metric(c, 'ddpm_requests_total{code="413"}') == 1
        assert _metric(c, 'ddpm_http_responses_total{code="401",route="/generate"}') == 1
        assert _metric(c, 'ddpm_http_responses_total{code="404",route="other"}') == 1
        assert _metric(c, 'ddpm_request_duration_seconds_count{outcome="unauthorized"}') == 1


def test_an_unhandled_error_is_a_json_500_with_the_request_id(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    state: ServerState = client.app.state.server  # type: ignore[attr-defined]

    def broken(client_key: str, n: int) -> bool:
        raise KeyError("bug")

    monkeypatch.setattr(state.clients, "acquire", broken)
    before = _metric(client, 'ddpm_requests_total{code="500"}')
    # a seed no other test asks for: a cached answer would need no quota (and not reach the bug)
    r = client.post("/generate", json={"seed": 424242, "steps": 2}, headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "internal server error", "request_id": "boom-1"} and r.headers["x-request-id"] == "boom-1"
    assert _metric(client, 'ddpm_requests_total{code="500"}') == before + 1


# the specification's own example (W3C Trace Context §3.2.2.5)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_access_line_carries_the_callers_trace(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    c, _ = app_and_state(model_dir, max_body_bytes=256)
    with c, caplog.at_level(logging.INFO, logger="ddpm.access"):
        _ready(c)
        caplog.clear()
        assert c.post("/generate", json={"seed": 1, "steps": 2}, headers={"traceparent": TRACEPARENT}).status_code == 200
        big = c.post("/generate", content=b"x" * 300, headers={"Content-Type": "application/json", "traceparent": TRACEPARENT})
        assert big.status_code == 413  # refused before the app: its line joins the trace too
        assert c.post("/generate", json={"seed": 1, "steps": 2}, headers={"traceparent": TRACEPARENT.upper()}).status_code == 200
        lines = [json.loads(JsonFormatter().format(x)) for x in caplog.records if x.name == "ddpm.access"]
        assert [(line["status"], line.get("trace_id"), line.get("parent_id")) for line in lines] == [
            (200, "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
            (413, "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
            (200, None, None),  # upper-case hex is no traceparent (§3.2.2)
        ]
        assert lines[0]["seed"] == 1  # the route's own fields beside it


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (TRACEPARENT, "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "4bf92f3577b34da6a3ce929d0e0e4736"),  # not sampled: still a trace
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds", "4bf92f3577b34da6a3ce929d0e0e4736"),  # §3.2.4
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more", None),  # version 00 has exactly four fields
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # version ff is invalid
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace-id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero parent-id
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),  # 31 hex digits
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),  # no flags
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.x", None),  # the flags not followed by a dash
        ("", None),
    ],
)
def test_traceparent_per_the_specification(header: str, trace_id: str | None) -> None:
    from service.api.trace_context import parse_traceparent

    parsed = parse_traceparent(header)
    assert (parsed.trace_id if parsed else None) == trace_id
