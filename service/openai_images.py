"""OpenAI's images API on this server: ``POST /v1/images/generations`` and ``GET /v1/models``, so that
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
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

from ddpm.grid import image_pngs
from ddpm.seeding import MAX_SEED
from service.auth import Authorized
from service.routes import ERRORS, JSON, ApiError, StateDep, chain_fields, encode_off_loop, images_or_not_modified, prepare
from service.schemas import ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList, OpenAIError
from service.server_state import ServerState
from service.strict_json import StrictJSONRoute

router = APIRouter(prefix="/v1", route_class=StrictJSONRoute, tags=["OpenAI-compatible"])
OPENAI_ERRORS = {code: {**spec, "model": OpenAIError} for code, spec in ERRORS.items()}
OPENAI_ERRORS[400] = {"model": OpenAIError, "description": "A size other than the model's, response_format url, or unreadable JSON"}
OPENAI_ERRORS[404] = {"model": OpenAIError, "description": "The model named is not the one served"}

# OpenAI's error types by status (the client keys its exception classes on the status alone)
ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", None),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    499: ("request_cancelled", "cancelled"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind, default_code = ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def openai_error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


def speaks_openai(path: str) -> bool:
    """Whether a request path is in OpenAI's dialect (its errors take OpenAI's shape)."""
    return path.startswith("/v1/")


def error_body_for(path: str, status: int, detail: str) -> dict[str, Any]:
    """The body of an error answered before routing (413, 408, an unhandled 500): OpenAI's shape under /v1/."""
    return openai_error_body(status, detail) if speaks_openai(path) else {"detail": detail}


def _invalid(param: str, message: str, status: int = 400, code: str | None = None) -> ApiError:
    return ApiError(status, message, "invalid", param=param, code=code)


# OpenAI's options with no effect on this server: the values accepted (None: the option must be absent)
OPTIONS: dict[str, tuple[str, ...]] = {
    "quality": ("auto", "standard"),
    "style": (),
    "output_format": ("png",),
    "output_compression": (),
    "background": ("auto", "opaque"),
    "moderation": ("auto", "low"),
}


def _check_options(body: ImageGenerationRequest) -> None:
    for param, accepted in OPTIONS.items():
        value = getattr(body, param)
        if value is None or value in accepted:
            continue
        can = f"it takes {' or '.join(map(repr, accepted))}" if accepted else "leave it out"
        raise _invalid(param, f"{param} {value!r} is not supported by this model ({can})", code="unsupported_value")


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
    responses=OPENAI_ERRORS,
    summary="OpenAI-compatible image generation (the prompt does not condition this unconditional model)",
)
async def images_generations(body: ImageGenerationRequest, request: Request, state: StateDep, _: Authorized) -> Response:
    try:
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        key = prepare(state, seed, body.n, body, n_field="n")  # readiness first: 503 before any 4xx about the model
        _check_model(state, body.model)
        _, h, w = state.model.image_shape  # type: ignore[union-attr]
        size = f"{w}x{h}"
        if body.size is not None and body.size != size:
            raise _invalid("size", f"size must be {size!r} (the model's own; it cannot generate {body.size!r})")
        if body.response_format == "url":
            raise _invalid("response_format", "response_format 'url' is not supported: this server keeps no images; use 'b64_json'")
        _check_options(body)
        request.state.log_fields.update({"user": body.user, "prompt_chars": len(body.prompt), "api": "openai"})
        generated = await images_or_not_modified(state, key, JSON, request)
        if isinstance(generated, Response):
            return generated
        images, cached = generated.images, generated.job is None

        def encode() -> object:  # PNG encoding off the event loop, as /generate's
            data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in image_pngs(images)]
            fields = chain_fields(state, key, cached)  # model: the served one (_check_model), seed: key.seed
            return jsonable_encoder(ImagesResponse(created=int(time.time()), data=data, size=size, **fields))

        content = await encode_off_loop(state, encode, request)
        response = JSONResponse(content, headers={"ETag": key.etag(JSON), "X-Cache": "hit" if cached else "miss"})
        request.state.outcome = "ok"
        return response
    except ApiError as exc:
        request.state.outcome = exc.outcome
        raise


def _model_card(state: ServerState) -> ModelCard:
    assert state.model is not None and state.facts is not None
    return ModelCard(id=state.model.name, created=state.facts.created)


def _require_model(state: ServerState) -> None:
    if state.model is None:
        raise ApiError(503, f"not ready: {state.not_ready_reason()}", "unavailable", {"Retry-After": str(state.settings.retry_after_s)})


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
