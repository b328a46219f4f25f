"""The FastAPI application: ``create_app(settings)``; the model loads in the background at startup.

The routers are one per resource (``service/api/routes/``); errors are answered here, in the server's
shape or, under /v1/, OpenAI's (``service/api/errors.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from ddpm import __version__
from service.api.auth import load_token
from service.api.cors import allow_cross_origin, parse_origins
from service.api.drain_admission import DrainAdmissionMiddleware
from service.api.errors import ApiError, error_body_for, openai_error_response, speaks_openai
from service.api.head_requests import HeadAsGetMiddleware
from service.api.request_log import RequestContextMiddleware
from service.api.request_target import AbsoluteFormMiddleware
from service.api.routes import generate, model, openai_images, operations
from service.api.strict_json import finite_jsonable
from service.server_state import ServerState
from service.settings import Settings, get_settings
from service.tracing import request_tracer

FORM = "multipart/form-data"
FORM_PATHS = ("/v1/images/edits", "/v1/images/variations")  # OpenAI's uploads; every other POST takes JSON
# FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from fastapi-offline's copy (/static-offline-docs/), not from a
# CDN: on a network without the internet (an air-gapped cluster, our own machines) FastAPI's own /docs was a blank page
DESCRIPTION = "DDPM (Ho et al. 2020) image generation with step-level batching. Image k of seed s depends on (model, s, k, steps) only."


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = state or ServerState(settings)
    tracer = state.tracer or request_tracer(settings.otlp_traces_endpoint, on_result=state.metrics.on_spans_exported)  # ValueError: no otel

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state.engine is None and state.load_error is None  # a state loaded by the caller is the caller's to stop
        if owned:
            state.start_loading()
        yield
        if owned:
            state.shutdown()
        if tracer is not None:
            tracer.flush()

    app = FastAPIOffline(title="ddpm-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)  # docs: no CDN (above)
    app.state.server = state
    app.state.api_token = load_token(settings)  # a bad token file fails here, at startup (later, a warning: auth.py)
    _document_access(app, token_required=app.state.api_token is not None, metrics_token=settings.metrics_require_token)
    for resource in (generate, openai_images, model, operations):
        app.include_router(resource.router)
    app.add_middleware(HeadAsGetMiddleware)  # innermost: the log and the metrics see HEAD
    app.add_middleware(DrainAdmissionMiddleware, state=state)  # inside RequestContextMiddleware (the one added last is outermost)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=state.max_body_bytes,
        read_timeout_s=settings.request_read_timeout_s,
        trust_forwarded_for=settings.trust_forwarded_for,
        observe=state.metrics.on_response,
        error_body=error_body_for,
        tracer=tracer,
    )
    allow_cross_origin(app, parse_origins(settings.cors_allow_origins))
    app.add_middleware(AbsoluteFormMiddleware)  # added last: outermost (everything sees the path, not http://host/path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # 422 with a one-line message naming the field, plus FastAPI's structured list; a body that
        # was not sent as JSON at all is 415. Under /v1/ (OpenAI's API) in OpenAI's error shape.
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        expected = FORM if request.url.path in FORM_PATHS else "application/json"
        openai = speaks_openai(request.url.path)
        if request.method == "POST" and content_type != expected:
            message = f"Content-Type must be {expected}, got {content_type or 'none'!r}"
            return openai_error_response(415, message) if openai else JSONResponse({"detail": message}, status_code=415)
        if openai:
            return openai_error_response(422, _validation_message(exc), _first_field(exc))
        return JSONResponse({"detail": _validation_message(exc), "errors": jsonable(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc, ApiError):  # the outcome the access log and the request counter give it
            request.state.outcome = exc.outcome
        if speaks_openai(request.url.path):
            return openai_error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None), exc.headers,
                                         getattr(exc, "code", None))  # fmt: skip
        return await http_exception_handler(request, exc)

    return app


def _document_access(app: FastAPI, token_required: bool, metrics_token: bool) -> None:
    """The schema says what this server enforces: every guarded route declares the bearer scheme
    (so /docs has an Authorize button), and where no token is configured, or /metrics is open, the
    requirement is marked optional (an empty alternative), as it is."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, methods in schema.get("paths", {}).items():
            for operation in methods.values():
                security = operation.get("security")
                enforced = token_required and (path != "/metrics" or metrics_token)
                if security and not enforced and {} not in security:
                    security.append({})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _first_field(exc: RequestValidationError) -> str | None:
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        if loc:
            return ".".join(loc)
    return None


def jsonable(errors: object) -> object:
    """pydantic's errors as JSON; the echoed inputs may hold NaN or inf, which JSON cannot carry."""
    return finite_jsonable(jsonable_encoder(errors, custom_encoder={Exception: str}))
