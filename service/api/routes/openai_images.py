"""OpenAI's images API on this server: ``POST /v1/images/generations``, ``/v1/images/edits`` (inpainting),
``/v1/images/variations`` (SDEdit) and ``GET /v1/models``, so that
the official ``openai`` client (and anything built on it) can call ddpm-serve unchanged. vLLM-Omni
serves diffusion models behind the same endpoint.

The same engine, limits, access control, response cache and metrics as ``/generate``; errors in
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` (``openai_error_response``), which
the client turns into its ``AuthenticationError``, ``UnprocessableEntityError``, ``RateLimitError``...
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ddpm.seeding import MAX_SEED
from service.api.deps import Authorized, StateDep
from service.api.errors import ApiError, documented, not_ready
from service.api.generation import (
    SSE,
    Generated,
    Scheduling,
    answer,
    cached_images,
    chain_fields,
    edit_from_upload,
    job_for,
    prepare,
    ready_model,
    scheduling,
)
from service.api.openai_stream import OpenAIImageStream
from service.api.output_format import OutputFormat, output_format_of
from service.api.schemas import (
    ImageData,
    ImageEditForm,
    ImageForm,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIError,
)
from service.api.strict_json import StrictJSONRoute
from service.response_cache import ImageKey
from service.server_state import ServerState

router = APIRouter(prefix="/v1", route_class=StrictJSONRoute, tags=["OpenAI-compatible"])
OPENAI_ERRORS = documented(openai=True)
OPENAI_ERRORS[400] = {"model": OpenAIError, "description": "A size other than the model's, response_format url, or unreadable JSON"}
OPENAI_ERRORS[404] = {"model": OpenAIError, "description": "The model named is not the one served"}
# the routes that stream (stream: true): the same 200 as Server-Sent Events (service/api/openai_stream.py)
STREAMING = {**OPENAI_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "ImagesResponse; with stream: true, "
                                    "partial_image events, then a completed event per image (or an error event)"}}


def _invalid(param: str, message: str, status: int = 400, code: str | None = None) -> ApiError:
    return ApiError(status, message, param=param, code=code)


# OpenAI's options with no effect on this server: the values accepted (None: the option must be absent)
OPTIONS: dict[str, tuple[str, ...]] = {
    "quality": ("auto", "standard"),
    "style": (),
    "background": ("auto", "opaque"),
    "moderation": ("auto", "low"),
    "input_fidelity": (),  # edits: the strength field sets how far an edit may go
    "complexity": (),  # nothing here plans an image apart from its steps
}


def _check_options(body: ImageGenerationRequest | ImageForm) -> None:
    for param, accepted in OPTIONS.items():
        value = getattr(body, param, None)
        if value is None or value in accepted:
            continue
        can = f"it takes {' or '.join(map(repr, accepted))}" if accepted else "leave it out"
        raise _invalid(param, f"{param} {value!r} is not supported by this model ({can})", code="unsupported_value")


def _end_user(body: ImageGenerationRequest | ImageForm) -> str | None:
    """The end user a request names for the log: ``safety_identifier``, else the ``user`` it deprecates (OpenAI's rule)."""
    return body.safety_identifier or body.user


def _check_model(state: ServerState, requested: str | None) -> None:
    assert state.model is not None
    if requested is not None and requested != state.model.name:
        raise _invalid(
            "model",
            f"model {requested!r} is not served here; this server serves {state.model.name!r} (GET /v1/models)",
            404,
            "model_not_found",
        )


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    responses=STREAMING,
    summary="OpenAI-compatible image generation (the prompt does not condition this unconditional model)",
)
async def images_generations(body: ImageGenerationRequest, request: Request, state: StateDep, _: Authorized) -> Response:
    key = prepare(state, _seed(body.seed), body.n, body, n_field="n")  # readiness first: 503 before any 4xx about the model
    size, fmt = _check_openai_fields(state, body)
    request.state.log_fields.update({"user": _end_user(body), "prompt_chars": len(body.prompt), "api": "openai"})
    sched = scheduling(state, body, request)
    if body.stream:
        return _stream(state, key, request, sched, "image_generation", size, fmt, body)
    return await _answer(state, key, size, fmt, request, sched)


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    responses=STREAMING,
    summary="OpenAI-compatible inpainting (RePaint): the mask's (or the image's) transparent pixels are repainted",
)
async def images_edits(form: Annotated[ImageEditForm, Form()], request: Request, state: StateDep, _: Authorized) -> Response:
    options = {"strength": form.strength, "jump_length": form.jump_length, "jump_n_sample": form.jump_n_sample}
    log = {"user": _end_user(form), "prompt_chars": len(form.prompt), "api": "openai", "edit": "inpaint"}
    return await _answer_upload(state, form, request, options, log, inpaint=True)


@router.post(
    "/images/variations",
    response_model=ImagesResponse,
    responses=OPENAI_ERRORS,
    summary="OpenAI-compatible variations (SDEdit): the image noised to strength (0.4) and denoised again",
)
async def images_variations(form: Annotated[ImageForm, Form()], request: Request, state: StateDep, _: Authorized) -> Response:
    log = {"user": _end_user(form), "api": "openai", "edit": "variation"}
    return await _answer_upload(state, form, request, {"strength": form.strength}, log, inpaint=False)


async def _answer_upload(
    state: ServerState, form: ImageForm, request: Request, options: dict[str, object], log: dict[str, object], inpaint: bool
) -> Response:
    """The routes that take an upload: its edit (an inpainting's mask, or the image's own transparency), answered."""
    ready_model(state)
    size, fmt = _check_openai_fields(state, form)
    mask = getattr(form, "mask", None) if inpaint else None
    edit = edit_from_upload(state, await _image(form), None if mask is None else await mask.read(), options, mask_from_alpha=inpaint)
    key = prepare(state, _seed(form.seed), form.n, form, n_field="n", edit=edit)
    request.state.log_fields.update(log)
    sched = scheduling(state, form, request)
    if getattr(form, "stream", None):  # edits stream; variations do not (OpenAI's neither)
        return _stream(state, key, request, sched, "image_edit", size, fmt, form)
    return await _answer(state, key, size, fmt, request, sched)


def _stream(state: ServerState, key: ImageKey, request: Request, sched: Scheduling, kind: str, size: str, fmt: OutputFormat,
            body: ImageGenerationRequest | ImageForm) -> StreamingResponse:  # fmt: skip
    """OpenAI's streamed answer (service/api/openai_stream.py): partial images, then each image."""
    cached = cached_images(state, key, request)
    previews = getattr(body, "partial_images", None) or 0
    handle, shared = (None, False) if cached is not None else job_for(state, key, request, sched, previews=previews)
    quality = getattr(body, "quality", None) or "auto"
    stream = OpenAIImageStream(state, key, request, handle, sched, kind, size, quality, fmt.name, fmt.encode, shared, previews)
    return StreamingResponse(stream.events(cached), media_type=SSE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(MAX_SEED)


async def _image(form: ImageForm) -> bytes:
    if form.image_list is not None and len(form.image_list) + (form.image is not None) > 1:
        raise _invalid("image", "one input image per request here (this model edits one image at a time)")
    upload = form.upload()
    if upload is None:
        raise _invalid("image", "image is required (a PNG, JPEG or WebP file in the multipart form)")
    return await upload.read()


def _check_openai_fields(state: ServerState, body: ImageGenerationRequest | ImageForm) -> tuple[str, OutputFormat]:
    """The model, size, response format and options a request names; the size string it is answered with, and its
    images' file format."""
    _check_model(state, body.model)
    _, h, w = state.model.image_shape  # type: ignore[union-attr]
    size = f"{w}x{h}"
    if body.size is not None and body.size not in (size, "auto"):  # auto (gpt-image-1's default): the model's own
        raise _invalid("size", f"size must be {size!r} (the model's own; it cannot generate {body.size!r})")
    if body.response_format == "url":
        raise _invalid("response_format", "response_format 'url' is not supported: this server keeps no images; use 'b64_json'")
    _check_options(body)
    return size, output_format_of(body)


async def _answer(state: ServerState, key: ImageKey, size: str, fmt: OutputFormat, request: Request, sched: Scheduling) -> Response:
    """The images of ``key`` in OpenAI's ImagesResponse (or 304), encoded off the event loop."""

    def encode(generated: Generated) -> object:
        data = [ImageData(b64_json=base64.b64encode(file).decode()) for file in fmt.encode(generated.images)]
        fields = chain_fields(state, key, generated.job is None)  # model: the served one (_check_model), seed: key.request.seed
        return jsonable_encoder(ImagesResponse(created=int(time.time()), data=data, size=size, output_format=fmt.name,
                                               priority=sched.priority, deadline_s=sched.deadline_s, **fields))  # fmt: skip

    return await answer(state, key, fmt.media(), request, sched, encode, JSONResponse)


def _model_card(state: ServerState) -> ModelCard:
    assert state.model is not None and state.facts is not None
    return ModelCard(id=state.model.name, created=state.facts.created)


def _require_model(state: ServerState) -> None:
    if state.model is None:
        raise not_ready(state)


@router.get("/models", response_model=ModelList, responses={401: OPENAI_ERRORS[401], 503: OPENAI_ERRORS[503]}, summary="The served model")
async def list_models(state: StateDep, _: Authorized) -> ModelList:
    _require_model(state)
    return ModelList(data=[_model_card(state)])


@router.get(
    "/models/{model:path}",
    response_model=ModelCard,
    responses={401: OPENAI_ERRORS[401], 404: OPENAI_ERRORS[404], 503: OPENAI_ERRORS[503]},
    summary="One model by id",
)
async def retrieve_model(model: Annotated[str, Path()], state: StateDep, _: Authorized) -> ModelCard:
    _require_model(state)
    _check_model(state, model)
    return _model_card(state)
