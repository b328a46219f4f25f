"""HTTP routes: validate, translate to an engine job, translate the result back. No model work here.

Responses are counted and logged by ``RequestContextMiddleware``; a route only says what the outcome
was (``request.state.outcome``, and for a stream, whose HTTP status is always 200, the status its
``error``/``result`` event carried: ``request.state.outcome_code``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ddpm.chain import ChainSpec, ChainTables, StepCoefficients
from ddpm.grid import image_pngs, make_grid, png_bytes
from ddpm.loaded_model import ChainError
from service.auth import Authorized, MetricsAuthorized
from service.content_negotiation import negotiate
from service.engine.errors import Cancelled, DeadlineExceeded, Draining, DrainTimeout, EngineStopped, QueueFull
from service.engine.job import Job
from service.engine.job_handle import JobHandle
from service.info import server_info
from service.response_cache import ImageKey, etag_matches
from service.schemas import (
    ChainRequest,
    ChainTable,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    SamplerName,
    ScheduleResponse,
    SpacingName,
    Timings,
    ValidationErrorResponse,
)
from service.server_state import ServerState
from service.strict_json import StrictJSONRoute

INDEX_HTML = Path(__file__).parent / "static" / "index.html"
JSON = "application/json"
PNG = "image/png"
NPY = "application/x-npy"
SSE = "text/event-stream"
log = logging.getLogger("ddpm.server")


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]
router = APIRouter(route_class=StrictJSONRoute)

ERRORS = {
    400: {"model": ErrorResponse, "description": "The body could not be read as JSON (e.g. not UTF-8)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when DDPM_API_TOKEN is set)"},
    413: {"model": ErrorResponse, "description": "Request body over DDPM_MAX_BODY_BYTES"},
    406: {"model": ErrorResponse, "description": "The Accept header accepts none of the media types this route answers with"},
    408: {"model": ErrorResponse, "description": "The request body did not arrive within DDPM_REQUEST_READ_TIMEOUT_S"},
    415: {"model": ErrorResponse, "description": "The body was not sent as application/json"},
    422: {
        "model": ValidationErrorResponse,
        "description": "Invalid input, a duplicate key or a non-finite number; the message names the field",
    },
    429: {"model": ErrorResponse, "description": "This client has DDPM_MAX_IMAGES_PER_CLIENT images in flight (with Retry-After)"},
    503: {
        "model": ErrorResponse,
        "description": "Not ready, draining, queue full, or the server stopped before running it (with Retry-After)",
    },
    504: {"model": ErrorResponse, "description": "The request's deadline passed; its samples left the batch"},
    500: {"model": ErrorResponse, "description": "A stage of the denoising iteration (or encoding the result) failed for this request"},
}


class ApiError(HTTPException):
    def __init__(
        self,
        status: int,
        detail: str,
        outcome: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(status, detail, headers)
        self.outcome = outcome
        self.param = param  # the request field at fault, where one is
        self.code = code  # a machine-readable reason (OpenAI's error.code), where the status alone does not say


def _field_error(field: str, message: str, value: object, where: str = "body") -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": (where, field), "msg": message, "input": value}])


def prepare(state: ServerState, seed: int, n: int, body: ChainRequest, n_field: str = "batch_size") -> ImageKey:
    """Check readiness and validate a request against the loaded model: the key of the images it asks
    for (errors as ApiError / a 422 naming the field): its chain, and a conditional model's labels and guidance."""
    reason = state.refusal_reason()
    if state.engine is None or state.model is None or state.facts is None or reason is not None:
        raise ApiError(503, f"not ready: {reason}", "unavailable", {"Retry-After": str(state.settings.retry_after_s)})
    if n > state.settings.max_images_per_request:
        raise _field_error(n_field, f"{n_field} must be <= {state.settings.max_images_per_request}", n)
    spec = resolve_chain(state, body.sampler, body.steps, body.eta, body.timestep_spacing, body.clip_denoised)
    try:
        labels, w = state.model.labels(body.class_label, n, body.guidance_scale)
    except ChainError as exc:
        raise _field_error(exc.field, str(exc), getattr(body, exc.field)) from exc
    return ImageKey(state.facts.fingerprint, state.precision, state.engine.device.type, seed, n, spec, labels, w)


def submit(state: ServerState, key: ImageKey, request: Request, stream: bool = False) -> JobHandle:
    """Hand the images of ``key`` to the engine, within the client's quota (errors as ApiError)."""
    spec, retry = key.chain, {"Retry-After": str(state.settings.retry_after_s)}
    client = request.state.client  # set by RequestContextMiddleware: the one policy for quota and log
    job = Job(
        seed=key.seed,
        n=key.n,
        chain=spec,
        timeout_s=state.settings.request_timeout_s,
        class_labels=key.labels,
        guidance_scale=key.guidance_scale,
        client=client,
        request_id=request.state.request_id,
    )
    if not state.clients.acquire(client, job.n):
        limit = state.settings.max_images_per_client
        raise ApiError(429, f"too many images in flight for this client (limit {limit})", "rejected", retry)
    handle = JobHandle(job, asyncio.get_running_loop(), on_release=lambda: state.clients.release(client, job.n), stream=stream)
    try:
        state.engine.submit(job)  # type: ignore[union-attr]  # prepare() checked it
    except (QueueFull, Draining, EngineStopped) as exc:
        state.clients.release(client, job.n)
        raise ApiError(503, str(exc), "rejected" if isinstance(exc, QueueFull) else "unavailable", retry) from exc
    return handle


@dataclass
class Generated:
    """Images of a request, computed now or found in the response cache."""

    images: torch.Tensor
    job: Job | None  # None: from the cache


def cached_images(state: ServerState, key: ImageKey, request: Request) -> torch.Tensor | None:
    """The images of ``key`` if the response cache holds them (counted as a hit or a miss)."""
    request.state.log_fields.update({"seed": key.seed, "batch_size": key.n, "steps": key.chain.steps, "sampler": key.chain.sampler})
    if not state.cache.enabled:
        return None
    images = state.cache.get(key)
    state.metrics.on_cache_lookup(images is not None)
    request.state.log_fields["cache"] = "miss" if images is None else "hit"
    return images


async def generate_images(state: ServerState, key: ImageKey, request: Request) -> Generated:
    """The images of ``key``: from the response cache, else from the engine (then cached)."""
    cached = cached_images(state, key, request)
    if cached is not None:
        return Generated(cached, None)
    job = await submit(state, key, request).wait(request.is_disconnected)
    return finished(state, key, job)


def finished(state: ServerState, key: ImageKey, job: Job) -> Generated:
    """A job the engine has finished: its images (now in the response cache), or its error as an ApiError."""
    error = _job_error(state, job)
    if error is not None:
        raise error
    assert job.images is not None
    state.cache.put(key, job.images)
    return Generated(job.images, job)


async def images_or_not_modified(state: ServerState, key: ImageKey, media: str, request: Request) -> Generated | Response:
    """304 when the client already holds this answer (If-None-Match naming its ETag: no U-Net call, no
    encoding), else the images (``generate_images``)."""
    etag = key.etag(media)
    if etag_matches(request.headers.get("if-none-match"), etag, held=key in state.cache):
        state.metrics.on_not_modified()
        request.state.log_fields["cache"] = "not_modified"
        request.state.outcome = "ok"
        return Response(status_code=304, headers={"ETag": etag})
    return await generate_images(state, key, request)


def resolve_chain(
    state: ServerState,
    sampler: str | None,
    steps: int | None,
    eta: float | None,
    spacing: str | None,
    clip: bool | None,
    where: str = "body",
) -> ChainSpec:
    """A request's chain: its own fields, else the server's defaults, else the model's; 422 naming the field."""
    assert state.model is not None
    settings = state.settings
    if steps is None:
        # Algorithm 2 named without steps is the paper's chain (T steps); otherwise the server's default
        t = state.model.schedule.num_timesteps
        steps = t if sampler == "ddpm" else min(settings.default_steps or t, t)
    sampler = sampler or settings.default_sampler
    try:
        return state.model.chain(sampler, steps, eta, spacing, clip, default_spacing=settings.default_timestep_spacing)
    except ChainError as exc:
        value = {"steps": steps, "eta": eta, "timestep_spacing": spacing}[exc.field]
        raise _field_error(exc.field, str(exc), value, where) from exc


def _job_error(state: ServerState, job: Job) -> ApiError | None:
    err = job.error
    if err is None:
        return None
    if isinstance(err, DeadlineExceeded):
        return ApiError(504, str(err), "timeout")
    if isinstance(err, (EngineStopped, DrainTimeout)):  # not run to the end: safe to send elsewhere
        return ApiError(503, str(err), "unavailable", {"Retry-After": str(state.settings.retry_after_s)})
    if isinstance(err, Cancelled):
        return ApiError(499, str(err), "cancelled")
    return ApiError(500, str(err), "error")  # EngineFault: a stage of the iteration failed


def _negotiate(accept: str | None, offered: list[str]) -> str:
    media = negotiate(accept, offered)
    if media is None:
        raise ApiError(406, f"Accept {accept!r} matches none of {', '.join(offered)}", "invalid")
    return media


async def encode_off_loop(state: ServerState, encode: Callable[[], object], request: Request) -> object:
    """Run an encoder (PNG / npy / JSON body) off the event loop; a failure is a 500 that says so."""
    try:
        return await asyncio.to_thread(_encode_now, state, encode)
    except Exception as exc:
        log.error("encoding the result failed", exc_info=exc, extra={"fields": {"stage": "encode", "request_id": request.state.request_id}})
        state.metrics.on_fault("encode", 1)
        raise ApiError(500, f"encoding the result failed ({type(exc).__name__}); the server log has the details", "error") from exc


def _encode_now(state: ServerState, encode: Callable[[], object]) -> object:
    state.faults("encode")
    return encode()


def _result_body(state: ServerState, key: ImageKey, generated: Generated, arrived: float) -> GenerateResponse:
    job = generated.job
    if job is not None:
        assert job.finished is not None and job.first_admitted is not None
        queue_wait, generation = job.first_admitted - job.created, job.finished - job.first_admitted
    else:
        queue_wait = generation = 0.0
    return GenerateResponse(
        **chain_fields(state, key, cached=job is None),
        batch_size=key.n,
        images=[base64.b64encode(png).decode() for png in image_pngs(generated.images)],
        timings=Timings(queue_wait_s=round(queue_wait, 6), generation_s=round(generation, 6), total_s=round(time.monotonic() - arrived, 6)),
    )


def chain_fields(state: ServerState, key: ImageKey, cached: bool) -> dict[str, object]:
    """What every generation answer (ours and OpenAI's dialect) says of the chain that made its images."""
    spec = key.chain
    return {
        "seed": key.seed,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "eta": spec.eta,
        "timestep_spacing": spec.spacing,
        "model": state.model.name if state.model else "",
        "precision": state.precision,
        "cached": cached,
        "class_labels": class_names(state, key),
        "guidance_scale": key.guidance_scale,
    }


def class_names(state: ServerState, key: ImageKey) -> list[str] | None:
    """The class name of each image of a class-conditional request (None for an unconditional one)."""
    if key.labels is None or state.model is None:
        return None
    return [state.model.class_names[label] for label in key.labels]


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
    try:
        media = _negotiate(accept, [JSON, PNG, NPY])
        key = prepare(state, body.seed, body.batch_size, body)
        generated = await images_or_not_modified(state, key, media, request)
        if isinstance(generated, Response):
            return generated
        images = generated.images
        if media == PNG:
            response: Response = Response(await encode_off_loop(state, lambda: png_bytes(make_grid(images)), request), media_type=PNG)
        elif media == NPY:
            response = Response(await encode_off_loop(state, lambda: _npy(images), request), media_type=NPY)
        else:
            content = await encode_off_loop(state, lambda: jsonable_encoder(_result_body(state, key, generated, arrived)), request)
            response = JSONResponse(content)
        response.headers["ETag"] = key.etag(media)
        response.headers["X-Cache"] = "miss" if generated.job is not None else "hit"
        request.state.outcome = "ok"
        return response
    except ApiError as exc:
        request.state.outcome = exc.outcome
        raise


def _sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.post(
    "/generate/stream",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "progress events, then result (or error)"}},
    summary="Like /generate, with Server-Sent Events: progress {steps_done, total}, then result or error",
)
async def generate_stream(
    body: GenerateRequest, request: Request, state: StateDep, _: Authorized, accept: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    arrived = time.monotonic()
    try:
        _negotiate(accept, [SSE])
        key = prepare(state, body.seed, body.batch_size, body)
        cached = cached_images(state, key, request)
        handle = None if cached is not None else submit(state, key, request, stream=True)
    except ApiError as exc:
        request.state.outcome = exc.outcome
        raise
    # (a RequestValidationError from prepare is answered by the app's validation handler)
    request.state.outcome, request.state.outcome_code = "cancelled", 499  # until the stream says otherwise
    keepalive_s = state.settings.sse_keepalive_s

    async def result(generated: Generated) -> AsyncIterator[str]:
        try:
            body = await encode_off_loop(state, lambda: jsonable_encoder(_result_body(state, key, generated, arrived)), request)
        except ApiError as exc:
            request.state.outcome, request.state.outcome_code = exc.outcome, exc.status_code
            yield _sse("error", {"status": exc.status_code, "detail": exc.detail})
        else:
            request.state.outcome, request.state.outcome_code = "ok", 200
            yield _sse("result", body)

    async def events() -> AsyncIterator[str]:
        if handle is None:  # from the cache
            assert cached is not None
            yield _sse("queued", {"batch_size": key.n, "steps": key.chain.steps, "images_ahead": 0, "cached": True})
            async for chunk in result(Generated(cached, None)):
                yield chunk
            return
        engine, job = state.engine, handle.job
        assert engine is not None
        try:
            ahead = engine.images_ahead(job)
            yield _sse("queued", {"batch_size": job.n, "steps": job.steps, "images_ahead": ahead or 0, "cached": False})
            last_write = time.monotonic()
            async for ev in handle.events(tick_s=min(1.0, keepalive_s)):
                if ev is not None:
                    fraction = round(ev.steps_done / ev.total, 4)
                    chunk = _sse("progress", {"steps_done": ev.steps_done, "total": ev.total, "fraction": fraction})
                else:
                    now_ahead = engine.images_ahead(job)
                    if now_ahead is not None and now_ahead != ahead:  # moved up in the queue
                        ahead = now_ahead
                        chunk = _sse("queued", {"batch_size": job.n, "steps": job.steps, "images_ahead": ahead, "cached": False})
                    elif time.monotonic() - last_write >= keepalive_s:
                        chunk = ": keep-alive\n\n"  # a comment line: SSE clients ignore it, proxies see traffic
                    else:
                        continue
                last_write = time.monotonic()
                yield chunk
            try:
                generated = finished(state, key, await handle.done)
            except ApiError as error:
                request.state.outcome, request.state.outcome_code = error.outcome, error.status_code
                yield _sse("error", {"status": error.status_code, "detail": error.detail})
                return
            async for chunk in result(generated):
                yield chunk
        finally:
            if not handle.done.done():  # the client went away mid-stream
                handle.job.cancel()

    return StreamingResponse(events(), media_type=SSE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get(
    "/schedule",
    response_model=ScheduleResponse,
    responses={401: ERRORS[401], 422: ERRORS[422], 503: ERRORS[503]},
    summary="The noise schedule of the loaded model",
)
async def schedule(
    state: StateDep,
    _: Authorized,
    sampler: Annotated[SamplerName | None, Query(description="with steps/eta/timestep_spacing: return that chain's table")] = None,
    steps: Annotated[int | None, Query(ge=1)] = None,
    eta: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)] = None,
    timestep_spacing: Annotated[SpacingName | None, Query()] = None,
    clip_denoised: Annotated[bool | None, Query()] = None,
) -> ScheduleResponse:
    if state.model is None:
        raise HTTPException(503, f"not ready: {state.not_ready_reason()}", {"Retry-After": str(state.settings.retry_after_s)})
    m = state.model
    chain = None
    if any(v is not None for v in (sampler, steps, eta, timestep_spacing, clip_denoised)):
        spec = resolve_chain(state, sampler, steps, eta, timestep_spacing, clip_denoised, where="query")
        tables = state.engine.chain_tables(spec) if state.engine is not None else ChainTables.for_spec(m.schedule, m.variance_type, spec)
        chain = _chain_table(tables, spec)
    return ScheduleResponse(**m.schedule.to_dict(), variance_type=m.variance_type.value, clip_denoised=m.clip_denoised, chain=chain)  # type: ignore[arg-type]


def _chain_table(tables: ChainTables, spec: ChainSpec) -> ChainTable:
    """The table in the order the steps run (position S-1 first), as the float32 values the engine uses."""
    order = list(reversed(range(tables.num_steps)))
    timesteps = [int(tables.timesteps[i]) for i in order]
    return ChainTable(
        sampler=spec.sampler,
        steps=spec.steps,
        eta=spec.eta,
        timestep_spacing=spec.spacing,
        steps_offset=spec.steps_offset,
        clip_denoised=spec.clip,
        timesteps=timesteps,
        noise_counter=[t + 1 for t in timesteps],
        coefficients={name: tables.table[row, order].tolist() for row, name in enumerate(StepCoefficients.names())},
    )


@router.get(
    "/info",
    response_model=InfoResponse,
    responses={401: ERRORS[401], 503: ERRORS[503]},
    summary="What this replica serves: model (name, weights SHA-256, size, cost per image-step), samplers, limits, device",
)
async def info(state: StateDep, _: Authorized) -> InfoResponse:
    if state.model is None or state.facts is None:
        raise HTTPException(503, f"not ready: {state.not_ready_reason()}", {"Retry-After": str(state.settings.retry_after_s)})
    return await asyncio.to_thread(server_info, state)  # the first call counts the U-Net's FLOPs (a forward pass)


@router.get("/healthz", responses={503: ERRORS[503]}, summary="The process can serve (or is still starting): 503 once it never can")
async def healthz(state: StateDep) -> JSONResponse:
    fatal = state.fatal_reason()
    if fatal is not None:
        return JSONResponse({"status": "failed", "detail": fatal}, status_code=503)
    return JSONResponse({"status": "ok"})


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
