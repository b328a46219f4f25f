"""Request ids, one structured log line per request, and the request-body size limit (pure ASGI)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ddpm.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


def configure_logging(fmt: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + headers})
    await send({"type": "http.response.body", "body": payload})


class RequestContextMiddleware:
    """X-Request-ID accepted (when well-formed) or generated, echoed on the response; bodies over
    ``max_body_bytes`` answered 413 before the app sees them; one access-log line per request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        status = {"code": 0}

        too_large = {"sent": False}

        async def send_with_id(message: Message) -> None:
            if too_large["sent"]:
                return  # the 413 is out; whatever the app answers after it is dropped
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        async def reject() -> None:
            status["code"] = 413
            await _send_json(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"}, [id_header])

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await reject()
                return
            received = {"n": 0}

            async def limited_receive() -> Message:
                message = await receive()
                if message["type"] == "http.request" and not too_large["sent"]:
                    received["n"] += len(message.get("body", b""))
                    if received["n"] > self.max_body_bytes:  # chunked bodies carry no length up front
                        await reject()
                        too_large["sent"] = True
                        return {"type": "http.disconnect"}  # the app stops reading
                return message

            await self.app(scope, limited_receive, send_with_id)
        finally:
            path = scope.get("path", "")
            if path not in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes would drown the log
                fields = {
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "path": path,
                    "status": status["code"],
                    "duration_s": round(time.monotonic() - start, 6),
                    "client": (scope.get("client") or ("", 0))[0],
                    **scope.get("state", {}).get("log_fields", {}),
                }
                log.info("request", extra={"fields": fields})
