"""HTTP routes: validate, translate to an engine job, translate the result back. No model work here."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ddpm.grid import image_pngs, make_grid, png_bytes
from service.auth import Authorized, MetricsAuthorized
from service.continuous_batcher import Cancelled, DeadlineExceeded, Draining, Job, ModelFailure, QueueFull
from service.runtime import JobHandle, ServerState
from service.schemas import ErrorResponse, GenerateRequest, GenerateResponse, ScheduleResponse, Timings, ValidationErrorResponse

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
NPY = "application/x-npy"


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]
router = APIRouter()

ERRORS = {
    400: {"model": ErrorResponse, "description": "The body could not be read as JSON (e.g. not UTF-8)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when DDPM_API_TOKEN is set)"},
    413: {"model": ErrorResponse, "description": "Request body over DDPM_MAX_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "The body was not sent as application/json"},
    422: {"model": ValidationErrorResponse, "description": "Invalid input; the message names the field"},
    429: {"model": ErrorResponse, "description": "This client has DDPM_MAX_IMAGES_PER_CLIENT images in flight (with Retry-After)"},
    503: {"model": ErrorResponse, "description": "Not ready, draining, or queue full (with Retry-After)"},
    504: {"model": ErrorResponse, "description": "The request's deadline passed; its samples left the batch"},
    500: {"model": ErrorResponse, "description": "The model call failed for this request"},
}


class ApiError(HTTPException):
    def __init__(self, status: int, detail: str, outcome: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)
        self.outcome = outcome


def _field_error(field: str, message: str, value: object) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def _submit(state: ServerState, body: GenerateRequest, request: Request, stream: bool = False) -> JobHandle:
    """Validate against the loaded model and hand the job to the engine (errors as ApiError)."""
    reason = state.not_ready_reason()
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if state.engine is None or state.model is None or (reason and reason != "the last model call failed"):
        raise ApiError(503, f"not ready: {reason}", "unavailable", retry)
    t = state.model.schedule.num_timesteps
    if body.steps is not None and body.steps > t:
        raise _field_error("steps", f"steps must be <= {t} (the model's T)", body.steps)
    if body.batch_size > state.settings.max_images_per_request:
        raise _field_error("batch_size", f"batch_size must be <= {state.settings.max_images_per_request}", body.batch_size)
    clip = state.model.clip_denoised if body.clip_denoised is None else body.clip_denoised
    job = Job(seed=body.seed, n=body.batch_size, steps=body.steps or t, clip_denoised=clip, timeout_s=state.settings.request_timeout_s)
    request.state.log_fields = {"seed": body.seed, "batch_size": body.batch_size, "steps": job.steps}
    client = client_key(request, state.settings.trust_forwarded_for)
    if not state.clients.acquire(client, job.n):
        limit = state.settings.max_images_per_client
        raise ApiError(429, f"too many images in flight for this client (limit {limit})", "rejected", retry)
    handle = JobHandle(job, asyncio.get_running_loop(), on_release=lambda: state.clients.release(client, job.n), stream=stream)
    try:
        state.engine.submit(job)
    except (QueueFull, Draining) as exc:
        state.clients.release(client, job.n)
        raise ApiError(503, str(exc), "rejected" if isinstance(exc, QueueFull) else "unavailable", retry) from exc
    return handle


def client_key(request: Request, trust_forwarded_for: bool) -> str:
    """Who a request counts against: the peer address, or behind our nginx the last X-Forwarded-For hop."""
    forwarded = request.headers.get("x-forwarded-for")
    if trust_forwarded_for and forwarded:
        return forwarded.split(",")[-1].strip()
    return request.client.host if request.client else "unknown"


def _job_error(job: Job) -> ApiError | None:
    err = job.error
    if err is None:
        return None
    if isinstance(err, DeadlineExceeded):
        return ApiError(504, str(err), "timeout")
    if isinstance(err, ModelFailure):
        return ApiError(500, str(err), "error")
    if isinstance(err, Cancelled):
        return ApiError(499, str(err), "cancelled")
    return ApiError(500, str(err), "error")


def _result_body(state: ServerState, job: Job, arrived: float) -> GenerateResponse:
    assert job.images is not None and job.finished is not None and job.first_admitted is not None
    return GenerateResponse(
        seed=job.seed,
        batch_size=job.n,
        steps=job.steps,
        model=state.model.name if state.model else "",
        images=[base64.b64encode(png).decode() for png in image_pngs(job.images)],
        timings=Timings(
            queue_wait_s=round(job.first_admitted - job.created, 6),
            generation_s=round(job.finished - job.first_admitted, 6),
            total_s=round(time.monotonic() - arrived, 6),
        ),
    )


def _npy(images: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ((images.clamp(-1, 1) + 1) / 2).numpy())  # type: ignore[attr-defined]  # (N, C, H, W) in [0, 1]
    return buf.getvalue()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **ERRORS,
        200: {"content": {"image/png": {}, NPY: {}}, "description": "JSON by default; Accept: image/png gives one PNG grid"},
    },
    summary="Sample images by DDPM's Algorithm 2",
)
async def generate(
    body: GenerateRequest, request: Request, state: StateDep, _: Authorized, accept: Annotated[str | None, Header()] = None
) -> Response:
    arrived = time.monotonic()
    outcome, code = "error", 500
    try:
        handle = _submit(state, body, request)
        job = await handle.wait(request.is_disconnected)
        error = _job_error(job)
        if error is not None:
            raise error
        outcome, code = "ok", 200
        assert job.images is not None
        if accept and "image/png" in accept:
            return Response(png_bytes(make_grid(job.images)), media_type="image/png")
        if accept and NPY in accept:
            return Response(_npy(job.images), media_type=NPY)
        return JSONResponse(jsonable_encoder(_result_body(state, job, arrived)))
    except ApiError as exc:
        outcome, code = exc.outcome, exc.status_code
        raise
    except RequestValidationError:
        code = 422  # counted by the app's validation handler, like body errors caught before this route
        raise
    finally:
        if code != 422:
            state.metrics.on_response(code, outcome, time.monotonic() - arrived)
        getattr(request.state, "log_fields", {})["outcome"] = outcome


def _sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.post(
    "/generate/stream",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "progress events, then result (or error)"}},
    summary="Like /generate, with Server-Sent Events: progress {steps_done, total}, then result or error",
)
async def generate_stream(body: GenerateRequest, request: Request, state: StateDep, _: Authorized) -> StreamingResponse:
    arrived = time.monotonic()
    try:
        handle = _submit(state, body, request, stream=True)
    except ApiError as exc:
        state.metrics.on_response(exc.status_code, exc.outcome, time.monotonic() - arrived)
        raise
    # (a RequestValidationError from _submit is counted by the app's validation handler)

    async def events() -> AsyncIterator[str]:
        code, outcome = 499, "cancelled"
        try:
            yield _sse("queued", {"batch_size": handle.job.n, "steps": handle.job.steps})
            async for ev in handle.events():
                yield _sse("progress", {"steps_done": ev.steps_done, "total": ev.total, "fraction": round(ev.steps_done / ev.total, 4)})
            job = await handle.done
            error = _job_error(job)
            if error is not None:
                code, outcome = error.status_code, error.outcome
                yield _sse("error", {"status": error.status_code, "detail": error.detail})
            else:
                code, outcome = 200, "ok"
                yield _sse("result", jsonable_encoder(_result_body(state, job, arrived)))
        finally:
            if not handle.done.done():  # the client went away mid-stream
                handle.job.cancel()
            state.metrics.on_response(code, outcome, time.monotonic() - arrived)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get(
    "/schedule",
    response_model=ScheduleResponse,
    responses={401: ERRORS[401], 503: ERRORS[503]},
    summary="The noise schedule of the loaded model",
)
async def schedule(state: StateDep, _: Authorized) -> ScheduleResponse:
    if state.model is None:
        raise HTTPException(503, f"not ready: {state.not_ready_reason()}", {"Retry-After": str(state.settings.retry_after_s)})
    m = state.model
    return ScheduleResponse(**m.schedule.to_dict(), variance_type=m.variance_type.value, clip_denoised=m.clip_denoised)  # type: ignore[arg-type]


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: ERRORS[503]}, summary="Model loaded and warmed up, not draining")
async def readyz(state: StateDep) -> JSONResponse:
    reason = state.not_ready_reason()
    if reason is None and state.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready", "detail": reason or "starting"}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, responses={401: ERRORS[401]}, summary="Prometheus metrics (text format)")
async def metrics(state: StateDep, _: MetricsAuthorized) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(INDEX_HTML.read_text())
