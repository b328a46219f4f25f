"""Every error the API answers, in one table: status -> its OpenAPI description, OpenAI's error type
and code, and the outcome the access log and ``ddpm_requests_total`` give it; engine error -> status.

A new engine error is one row of ``ENGINE_ERRORS`` (and a new status one row of ``STATUSES``): the
routes, OpenAI's error shape, the log's outcome and the OpenAPI schema all read them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.api.schemas import ErrorResponse, OpenAIError, ValidationErrorResponse
from service.engine.errors import (
    Cancelled,
    DeadlineExceeded,
    DeadlineUnmeetable,
    Draining,
    DrainTimeout,
    EngineError,
    EngineFault,
    EngineStopped,
    QueueFull,
)
from service.server_state import ServerState


@dataclass(frozen=True)
class Status:
    outcome: str  # the access log's and the request counter's label
    openai_type: str  # OpenAI's error.type (its client keys its exception classes on the status alone)
    openai_code: str | None = None  # OpenAI's error.code where the status does not say it all
    description: str | None = None  # the OpenAPI schema's (None: not answered by /generate's routes)


# fmt: off
STATUSES: dict[int, Status] = {
    400: Status("invalid", "invalid_request_error", None, "The body could not be read as JSON (e.g. not UTF-8)"),
    401: Status("unauthorized", "invalid_request_error", "invalid_api_key", "Missing or wrong bearer token (when DDPM_API_TOKEN is set)"),
    404: Status("invalid", "invalid_request_error"),
    405: Status("invalid", "invalid_request_error", "method_not_allowed"),
    406: Status("invalid", "invalid_request_error", None, "The Accept header accepts none of the media types this route answers with"),
    408: Status("invalid", "invalid_request_error", "request_timeout",
                "The request body did not arrive within DDPM_REQUEST_READ_TIMEOUT_S"),
    413: Status("invalid", "invalid_request_error", "request_too_large", "Request body over DDPM_MAX_BODY_BYTES"),
    415: Status("invalid", "invalid_request_error", "unsupported_media_type", "The body was not sent as application/json"),
    422: Status("invalid", "invalid_request_error", "invalid_value",
                "Invalid input, a duplicate key or a non-finite number; the message names the field"),
    429: Status("rejected", "rate_limit_error", "rate_limit_exceeded",
                "This client has DDPM_MAX_IMAGES_PER_CLIENT images in flight (with Retry-After)"),
    499: Status("cancelled", "request_cancelled", "cancelled"),
    500: Status("error", "server_error", None, "A stage of the denoising iteration (or encoding the result) failed for this request"),
    503: Status("unavailable", "server_error", "service_unavailable",
                "Not ready, draining, queue full, or the server stopped before running it (with Retry-After)"),
    504: Status("timeout", "server_error", "timeout", "The request's deadline passed; its samples left the batch"),
}
# fmt: on

# engine error -> (status, outcome where it is not the status's own); the first match in order wins
ENGINE_ERRORS: list[tuple[type[EngineError], int, str | None]] = [
    (QueueFull, 503, "rejected"),  # refused at submit: this replica is full, not broken
    (DeadlineUnmeetable, 503, "rejected"),  # refused at submit: its deadline cannot be met here (Retry-After: the predicted wait)
    (Draining, 503, None),
    (EngineStopped, 503, None),  # not run to the end: safe to send elsewhere
    (DrainTimeout, 503, None),
    (DeadlineExceeded, 504, None),
    (Cancelled, 499, None),
    (EngineFault, 500, None),  # a stage of the iteration failed
]
RETRY_STATUSES = (429, 503)  # answered with Retry-After


def outcome_of(status: int) -> str:
    """The outcome of a response no route labelled (rejected before reaching one, or unlabelled routes)."""
    if status in STATUSES:
        return STATUSES[status].outcome
    return "invalid" if 400 <= status < 500 else "ok" if status < 400 else "error"


def documented(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route for these statuses (all documented ones when none given)."""
    model = OpenAIError if openai else None
    chosen = statuses or tuple(code for code, status in STATUSES.items() if status.description is not None)
    out: dict[int | str, dict[str, Any]] = {}
    for code in chosen:
        body = model or (ValidationErrorResponse if code == 422 else ErrorResponse)
        out[code] = {"model": body, "description": STATUSES[code].description or ""}
    return out


class ApiError(HTTPException):
    def __init__(
        self,
        status: int,
        detail: str,
        outcome: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(status, detail, headers)
        self.outcome = outcome or outcome_of(status)
        self.param = param  # the request field at fault, where one is
        self.code = code  # a machine-readable reason (OpenAI's error.code), where the status alone does not say


def retry_after(state: ServerState) -> dict[str, str]:
    return {"Retry-After": str(state.settings.retry_after_s)}


def not_ready(state: ServerState, reason: str | None = None) -> ApiError:
    """503 + Retry-After: the replica cannot take this request now (loading, draining, failed)."""
    return ApiError(503, f"not ready: {reason or state.not_ready_reason()}", "unavailable", retry_after(state))


def engine_error(state: ServerState, error: EngineError) -> ApiError:
    """The answer to a job the engine refused or failed."""
    for kind, status, outcome in ENGINE_ERRORS:
        if isinstance(error, kind):
            headers = retry_after(state) if status in RETRY_STATUSES else None
            if isinstance(error, DeadlineUnmeetable):
                headers = {"Retry-After": str(math.ceil(error.retry_after_s))}
            return ApiError(status, str(error), outcome, headers)
    return ApiError(500, str(error))


def field_error(field: str, message: str, value: object, where: str = "body", ctx: dict[str, Any] | None = None) -> RequestValidationError:
    """A 422 naming one request field (answered by the app's validation handler); ``ctx``: numbers a client can act on,
    in the error's ``ctx`` (pydantic's place for them)."""
    error = {"type": "value_error", "loc": (where, field), "msg": message, "input": value}
    return RequestValidationError([{**error, "ctx": ctx} if ctx else error])


# --- OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, under /v1/ --------------------
def speaks_openai(path: str) -> bool:
    """Whether a request path is in OpenAI's dialect (its errors take OpenAI's shape)."""
    return path.startswith("/v1/")


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's convention for a status the table does not name: a 4xx is the caller's (invalid_request_error),
    a 5xx the server's (server_error)."""
    known = STATUSES.get(status) or Status(outcome_of(status), "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": known.openai_type, "param": param, "code": code or known.openai_code}}


def openai_error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


def error_body_for(path: str, status: int, detail: str) -> dict[str, Any]:
    """The body of an error answered before routing (413, 408, an unhandled 500): OpenAI's shape under /v1/."""
    return openai_error_body(status, detail) if speaks_openai(path) else {"detail": detail}
