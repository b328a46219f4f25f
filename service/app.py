"""The FastAPI application: ``create_app(settings)``; the model loads in the background at startup."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.auth import load_token
from service.request_log import RequestContextMiddleware
from service.routes import router
from service.runtime import ServerState
from service.settings import Settings, get_settings
from service.strict_json import finite_jsonable


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = state or ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state.engine is None and state.load_error is None  # a state loaded by the caller is the caller's to stop
        if owned:
            state.start_loading()
        yield
        if owned:
            state.shutdown()

    app = FastAPI(
        title="ddpm-serve",
        version="0.1.0",
        description=(
            "DDPM (Ho et al. 2020) image generation with step-level batching. Image k of seed s depends on (model, s, k, steps) only."
        ),
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.api_token = load_token(settings)  # a bad token file fails here, at startup
    app.include_router(router)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        read_timeout_s=settings.request_read_timeout_s,
        trust_forwarded_for=settings.trust_forwarded_for,
        observe=state.metrics.on_response,
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # 422 with a one-line message naming the field, plus FastAPI's structured list; a body that
        # was not sent as JSON at all is 415
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        not_json = request.method == "POST" and content_type != "application/json"
        if not_json:
            return JSONResponse({"detail": f"Content-Type must be application/json, got {content_type or 'none'!r}"}, status_code=415)
        return JSONResponse({"detail": _validation_message(exc), "errors": jsonable(exc.errors())}, status_code=422)

    return app


def jsonable(errors: object) -> object:
    """pydantic's errors as JSON; the echoed inputs may hold NaN or inf, which JSON cannot carry."""
    return finite_jsonable(jsonable_encoder(errors, custom_encoder={Exception: str}))
