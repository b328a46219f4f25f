"""The request context (pure ASGI): request id, client identity, body limits and read deadline, one
structured log line and one metrics observation per response, and a JSON 500 for anything unhandled."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import outcome_of
from service.api.trace_context import parse_traceparent
from service.tracing import RequestTracer

log = logging.getLogger("ddpm.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapes would drown the log


ResponseObserver = Callable[[str, str, int, str, float], None]  # (method, path, status, outcome, seconds)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``fields`` passed in ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message key=value ...``: the same fields as the JSON lines, for humans."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", {})
        if not fields:
            return line
        pairs = " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, (int, float)) else v}" for k, v in fields.items())
        head, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {pairs}{newline}{rest}"


def configure_logging(fmt: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def client_key(scope: Scope, trust_forwarded_for: bool) -> str:
    """Who a request counts against (quota, fairness) and who the log names: the TCP peer, or behind
    our nginx (DDPM_TRUST_FORWARDED_FOR) the last X-Forwarded-For hop, which nginx itself appended.
    The one policy: uvicorn's own proxy-header rewriting is off (``ddpm serve`` sets proxy_headers=False)."""
    if trust_forwarded_for:
        for name, value in scope.get("headers") or []:
            if name == b"x-forwarded-for":
                hop = value.decode("latin-1").split(",")[-1].strip()
                if hop:
                    return hop
    client = scope.get("client")
    return _unmapped(client[0]) if client else "unknown"


def _unmapped(address: str) -> str:
    """An IPv4 client of the dual-stack socket (``--host ::``) arrives as ``::ffff:a.b.c.d``: it is ``a.b.c.d``, in the
    log and in its quota, as it was on an IPv4 socket."""
    if address.startswith("::ffff:"):
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(address).ipv4_mapped
            return str(mapped) if mapped else address
    return address


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + headers})
    await send({"type": "http.response.body", "body": payload})


def refusal_from_headers(headers: dict[bytes, bytes], limit: int) -> tuple[int, str] | None:
    """What the headers alone refuse: a body declared over the limit (413), or one in a content coding this server
    does not decode (415, RFC 9110 15.5.16: a gzip body was parsed as JSON and answered "not UTF-8", and a plain one
    labelled ``br`` was taken)."""
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return 413, f"request body over {limit} bytes"
    coding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
    if coding not in ("", "identity"):
        return 415, f"Content-Encoding {coding} is not supported: send the body uncompressed"
    return None


class RequestContextMiddleware:
    """X-Request-ID accepted (when well-formed) or generated, echoed on the response; the client key
    computed once; bodies over ``max_body_bytes`` answered 413 and bodies that do not arrive within
    ``read_timeout_s`` 408 before the app sees them; any exception the app leaves unhandled answered
    as a JSON 500 with the request id; one access-log line and one ``observe`` call per response."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int | Callable[[], int],
        read_timeout_s: float = 10.0,
        trust_forwarded_for: bool = False,
        observe: ResponseObserver | None = None,
        error_body: Callable[[str, int, str], dict[str, Any]] | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.app = app
        self.tracer = tracer
        # the body of an error this middleware answers itself, by path (OpenAI's shape under /v1/)
        self.error_body = error_body or (lambda path, status, detail: {"detail": detail})
        self.body_limit = max_body_bytes if callable(max_body_bytes) else lambda: max_body_bytes  # may follow the loaded model
        self.read_timeout_s = read_timeout_s
        self.trust_forwarded_for = trust_forwarded_for
        self.observe = observe

    # long: one ASGI call whose closures (send, refuse, receive) share the request's status and body count
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        # arrived: when the request reached the server, where its deadline (deadline_s) counts from
        trace = parse_traceparent(headers.get(b"traceparent", b"").decode("latin-1"))  # the access line joins the caller's trace
        trace_fields = {} if trace is None else trace.log_fields()
        client = client_key(scope, self.trust_forwarded_for)
        state.update(request_id=request_id, client=client, log_fields=dict(trace_fields), arrived=start, trace=trace)
        id_header = (b"x-request-id", request_id.encode())
        nosniff = (b"x-content-type-options", b"nosniff")  # a body is what its Content-Type says (no HTML sniffed from a PNG or JSON)
        status = {"code": 0}
        refused = {"sent": False}  # a 413/408 went out; the app's own answer is dropped

        async def send_with_id(message: Message) -> None:
            if refused["sent"]:
                return
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), id_header, nosniff]
            await send(message)

        async def refuse(code: int, detail: str) -> None:
            status["code"] = code
            refused["sent"] = True
            body = self.error_body(scope.get("path", ""), code, detail)
            await _send_json(send, code, body, [id_header, nosniff, (b"connection", b"close")])

        limit = self.body_limit()
        try:
            refusal = refusal_from_headers(headers, limit)
            if refusal is not None:
                await refuse(*refusal)
                return
            body = {"n": 0, "complete": scope.get("method") in ("GET", "HEAD")}
            deadline = start + self.read_timeout_s

            async def guarded_receive() -> Message:
                if body["complete"] or refused["sent"]:
                    return await receive()  # after the body: disconnect polling, no deadline
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    await refuse(408, f"request body not received within {self.read_timeout_s:g} s")
                    return {"type": "http.disconnect"}  # the app stops reading
                if message["type"] == "http.request":
                    body["n"] += len(message.get("body", b""))
                    if body["n"] > limit:  # chunked bodies carry no length up front
                        await refuse(413, f"request body over {limit} bytes")
                        return {"type": "http.disconnect"}
                    body["complete"] = not message.get("more_body", False)
                return message

            await self.app(scope, guarded_receive, send_with_id)
        except Exception as exc:
            if refused["sent"]:  # the app stopped reading at our 413/408 (ClientDisconnect): a client error, in the access line
                return
            if isinstance(exc, ClientDisconnect):  # the body was cut short: the client left (499), or sent what uvicorn
                status["code"] = state.get("protocol_refused", 499)  # refused mid-body with a 400 of its own (a bad chunk)
                return  # not a server error: no traceback, not counted 500
            where = {"request_id": request_id, "path": scope.get("path"), **trace_fields}
            log.error("unhandled error", exc_info=exc, extra={"fields": where})
            if status["code"] == 0:
                status["code"] = 500
                error = {**self.error_body(scope.get("path", ""), 500, "internal server error"), "request_id": request_id}
                await _send_json(send, 500, error, [id_header])
        finally:
            self._record(scope, state, request_id, status["code"], time.monotonic() - start)

    def _record(self, scope: Scope, state: dict[str, Any], request_id: str, http_status: int, seconds: float) -> None:
        # a stream's HTTP status is 200 from its first byte; what it ended with is the outcome code
        code = state.get("outcome_code") or http_status
        outcome = state.get("outcome") or outcome_of(code)
        if state.get("client_gone") and code < 400:  # the connection ended before the answer was written
            code, outcome = 499, "cancelled"
        if code >= 400 and outcome == "ok":
            outcome = outcome_of(code)  # a route that said "ok" before something after it failed
        path = scope.get("path", "")
        if self.observe is not None:
            try:
                self.observe(scope.get("method", ""), path, code, outcome, seconds)
            except Exception as exc:
                log.error("response observer failed", exc_info=exc)
        if path in QUIET_PATHS:
            return
        if self.tracer is not None:
            self._trace(scope, state, request_id, code, outcome)
        fields = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": path,
            "status": code,
            **({"http_status": http_status} if http_status != code else {}),
            "outcome": outcome,
            "duration_s": round(seconds, 6),
            "client": state.get("client"),
            **state.get("log_fields", {}),
        }
        log.info("request", extra={"fields": fields})

    def _trace(self, scope: Scope, state: dict[str, Any], request_id: str, code: int, outcome: str) -> None:
        assert self.tracer is not None
        fields = {"request_id": request_id, **state.get("log_fields", {})}
        try:
            self.tracer.record(scope.get("method", ""), scope.get("path", ""), code, outcome, state["arrived"], fields,
                               parent=state.get("trace"), job=state.get("job"))  # fmt: skip
        except Exception as exc:  # a span is never worth a request: said, and the answer stands
            log.error("recording the request's span failed", exc_info=exc)
