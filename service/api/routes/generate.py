"""``POST /generate`` (JSON, one PNG grid, or a npy array) and ``POST /generate/stream`` (Server-Sent Events)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ddpm.grid import make_grid, png_bytes
from service.api.deps import Authorized, StateDep, StrictQuery
from service.api.errors import documented, field_error
from service.api.generation import (
    JSON,
    NPY,
    PNG,
    SSE,
    Generated,
    answer,
    cached_images,
    choose_media,
    edit_from_fields,
    job_for,
    prepare,
    result_body,
    scheduling,
)
from service.api.progress_stream import ProgressStream
from service.api.schemas import GenerateRequest, GenerateResponse
from service.api.strict_json import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)


def _npy(images: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ((images.clamp(-1, 1) + 1) / 2).numpy())  # type: ignore[attr-defined]  # (N, C, H, W) in [0, 1]
    return buf.getvalue()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **documented(),
        200: {"content": {"image/png": {}, NPY: {}}, "description": "JSON by default; Accept: image/png gives one PNG grid"},
    },
    summary="Sample images by DDPM's Algorithm 2",
    dependencies=[StrictQuery],  # ?batch_size=4 was ignored: one image, silently
)
async def generate(
    body: GenerateRequest, request: Request, state: StateDep, _: Authorized, accept: Annotated[str | None, Header()] = None
) -> Response:
    arrived = time.monotonic()
    media = choose_media(accept, [JSON, PNG, NPY])
    if body.previews:
        raise field_error("previews", "previews come as events of POST /generate/stream; /generate answers once", body.previews)
    key = prepare(state, body.seed, body.batch_size, body, edit=edit_from_fields(state, body))
    sched = scheduling(state, body, request)
    encoders: dict[str, tuple[Callable[[Generated], object], Callable[[Any], Response]]] = {
        PNG: (lambda g: png_bytes(make_grid(g.images)), lambda content: Response(content, media_type=PNG)),
        NPY: (lambda g: _npy(g.images), lambda content: Response(content, media_type=NPY)),
        JSON: (lambda g: jsonable_encoder(result_body(state, key, g, arrived, sched)), JSONResponse),
    }
    return await answer(state, key, media, request, sched, *encoders[media])


@router.post(
    "/generate/stream",
    responses={**documented(), 200: {"content": {"text/event-stream": {}}, "description": "progress events, then result (or error)"}},
    summary="Like /generate, with Server-Sent Events: progress {steps_done, total}, then result or error",
    dependencies=[StrictQuery],
)
async def generate_stream(
    body: GenerateRequest, request: Request, state: StateDep, _: Authorized, accept: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    arrived = time.monotonic()
    choose_media(accept, [SSE])
    key = prepare(state, body.seed, body.batch_size, body, edit=edit_from_fields(state, body))
    sched = scheduling(state, body, request)
    cached = cached_images(state, key, request)
    handle, shared = (None, False) if cached is not None else job_for(state, key, request, sched, stream=True, previews=body.previews)
    stream = ProgressStream(state, key, request, arrived, handle, sched, shared, body.previews)
    events = stream.events(None if cached is None else Generated(cached, None))
    return StreamingResponse(events, media_type=SSE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
