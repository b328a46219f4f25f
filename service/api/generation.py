"""What every generation route shares (ours and OpenAI's dialect): check a request against the loaded
model (``prepare``), then one pipeline (``answer``): a 304, or the images from the response cache or the
engine (``submit``, ``finished``), encoded off the event loop, with ETag and X-Cache. A route says only
how to encode (its media types) and wrap the result; the stream answers with events (progress_stream.py).

``prepare`` makes the request object (``ddpm.image_request.ImageRequest``) once; the cache key wraps it and
the engine's job carries it unchanged. A new request field: the schema (schemas.py), ``ImageRequest`` (or,
if it changes the maths, ``ChainSpec``, filled by ``resolve_chain``), and ``chain_fields`` to echo it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import Response

from ddpm.chain import ChainSpec
from ddpm.editing import edit_options
from ddpm.grid import image_pngs
from ddpm.image_inputs import base64_chars, keep_mask
from ddpm.image_request import EditInput, ImageRequest
from ddpm.loaded_model import ChainError, LoadedModel
from ddpm.names import DEFAULT_INPAINTING_SAMPLER
from ddpm.samplers import sampler_rule
from service.api.content_negotiation import negotiate
from service.api.edit_inputs import InputError, b64_png, decode_image, decode_mask
from service.api.errors import ApiError, engine_error, field_error, not_ready, retry_after
from service.api.job_handle import JobHandle
from service.api.schemas import ChainRequest, EditFields, GenerateResponse, ImageForm, SchedulingFields, Timings
from service.engine.errors import Cancelled, EngineError
from service.engine.job import Job
from service.response_cache import ImageKey, etag_matches
from service.server_state import ROUTED_BEFORE_DRAIN, ServerState
from service.settings_check import ADMISSION_BOUNDS, variable

JSON = "application/json"
PNG = "image/png"
NPY = "application/x-npy"
SSE = "text/event-stream"
log = logging.getLogger("ddpm.server")


def choose_media(accept: str | None, offered: list[str]) -> str:
    """The media type of the answer (RFC 9110 negotiation), or 406."""
    media = negotiate(accept, offered)
    if media is None:
        raise ApiError(406, f"Accept {accept!r} matches none of {', '.join(offered)}")
    return media


def ready_model(state: ServerState) -> LoadedModel:
    """The loaded model, or 503 + Retry-After when this replica takes no request now."""
    reason = state.refusal_reason()
    if state.engine is None or state.model is None or state.facts is None or reason is not None:
        raise not_ready(state, reason)
    return state.model


def prepare(
    state: ServerState, seed: int, n: int, body: ChainRequest | ImageForm, n_field: str = "batch_size", edit: Edit | None = None
) -> ImageKey:
    """Check readiness and validate a request against the loaded model: the key of the images it asks
    for (errors as ApiError / a 422 naming the field): its chain, a conditional model's labels and
    guidance, and an edit's input (``edit_from_fields``, ``edit_from_upload``)."""
    model = ready_model(state)
    assert state.engine is not None and state.facts is not None
    if n > state.settings.max_images_per_request:
        raise field_error(n_field, f"{n_field} must be <= {state.settings.max_images_per_request}", n)
    options = {} if edit is None else edit.options
    spec = resolve_chain(state, body.sampler, body.steps, body.eta, body.timestep_spacing, body.clip_denoised, **options)
    try:
        labels, w = model.labels(body.class_label, n, body.guidance_scale, body.first_image)
    except ChainError as exc:
        raise field_error(exc.field, str(exc), getattr(body, exc.field)) from exc
    asked = ImageRequest(seed, n, spec, labels, w, None if edit is None else edit.input, body.first_image)
    key = ImageKey(state.facts.fingerprint, state.precision, state.engine.device.type, asked)
    cost, bound = asked.cost, state.settings.max_calls_per_request
    if cost > bound:  # known on arrival: refused before it holds a row (RePaint's resampling multiplies the calls)
        state.metrics.on_refused("cost")
        raise field_error(n_field, f"this request costs {cost} U-Net row-calls ({n} images x {spec.unet_calls} calls each"
                          f"{' x 2 (guided)' if w else ''}); the bound is {bound} (DDPM_MAX_CALLS_PER_REQUEST)", n,
                          ctx={"cost": cost, "bound": bound, "calls_per_image": cost // n})  # a client asks for fewer at once  # fmt: skip
    never = never_admitted(state, n, cost)
    if never is not None:  # a 429 or 503 would be retried for ever: it could not run on an idle server either
        state.metrics.on_refused("size")
        raise field_error(n_field, never, n)
    return key


def never_admitted(state: ServerState, n: int, cost: int) -> str | None:
    """Why a request within the per-request bounds could never be admitted, where the settings' other bounds are
    smaller (DDPM_MAX_IMAGES_PER_REQUEST over DDPM_MAX_QUEUE or DDPM_MAX_IMAGES_PER_CLIENT, and the like)."""
    for unit, _, bound, who in ADMISSION_BOUNDS:
        asked, limit = (n if unit == "images" else cost), getattr(state.settings, bound)
        if asked > limit:
            return f"this request asks for {asked} {unit}, and {who} {limit} ({variable(bound)}): it could never run here"
    return None


@dataclass(frozen=True)
class Scheduling:
    """How a request is served (issue 37): not what it makes, so not part of its key or ETag."""

    priority: int = 0
    deadline_s: float | None = None


def scheduling(state: ServerState, fields: SchedulingFields | ImageForm, request: Request) -> Scheduling:
    """The request's priority within the server's bounds (a client holding the API token may ask down to
    DDPM_MIN_PRIORITY; on an open server nobody below DDPM_MIN_PRIORITY_ANONYMOUS) and its deadline."""
    s = state.settings
    floor = s.min_priority if request.app.state.api_token is not None else s.min_priority_anonymous
    priority = min(max(fields.priority if fields.priority is not None else 0, floor), s.max_priority)
    deadline = fields.deadline_s if fields.deadline_s is not None else s.default_deadline_s
    return Scheduling(priority, deadline)


@dataclass(frozen=True)
class Edit:
    """An edit's decoded input and its chain options (``LoadedModel.chain``'s strength, repaint, jumps)."""

    input: EditInput
    options: dict[str, Any]


def edit_from_fields(state: ServerState, fields: EditFields) -> Edit | None:
    """/generate's editing fields (base64 PNGs), or None without an image."""
    if fields.image is None:
        for name in ("mask", "strength", "jump_length", "jump_n_sample"):
            if getattr(fields, name) is not None:
                raise field_error(name, f"{name} needs an input image", getattr(fields, name) if name != "mask" else "<png>")
        return None
    shape = ready_model(state).image_shape
    limit = state.max_input_bytes()
    try:
        image, _ = decode_image("image", _b64_input("image", fields.image, limit), shape)
        mask = None if fields.mask is None else decode_mask("mask", _b64_input("mask", fields.mask, limit), shape)
    except InputError as exc:
        raise field_error(exc.field, str(exc), f"<{len(getattr(fields, exc.field) or '')} base64 characters>") from exc
    return Edit(EditInput.of(image, mask), edit_options(fields.strength, mask is not None, fields.jump_length, fields.jump_n_sample))


def edit_from_upload(
    state: ServerState, image: bytes, mask: bytes | None, options: dict[str, Any], mask_from_alpha: bool = False
) -> Edit:
    """OpenAI's uploads: the image, and the mask (or, ``mask_from_alpha``, the image's own transparency,
    as OpenAI's edits take it when no mask is sent). ``options``: strength and jumps as the form gave them."""
    shape = ready_model(state).image_shape
    limit = state.max_input_bytes()
    try:
        pixels, alpha = decode_image("image", _sized(image, limit, "image"), shape)
        if mask is not None:
            keep = decode_mask("mask", _sized(mask, limit, "mask"), shape)
        elif mask_from_alpha:
            if alpha is None or (alpha > 0).all():
                raise InputError("mask", "send a mask, or an image with transparent pixels (alpha 0) marking what to edit")
            keep = keep_mask("mask", alpha > 0, shape, "no transparent pixel")
        else:
            keep = None
    except InputError as exc:  # OpenAI answers an unusable upload with 400 naming the parameter
        raise ApiError(400, str(exc), param=exc.field, code="invalid_image") from exc
    return Edit(EditInput.of(pixels, keep), edit_options(repaint=keep is not None, **options))


def _b64_input(field: str, text: str, limit: int) -> bytes:
    """The bytes of a base64 input of at most ``limit`` bytes; a text longer than any such base64 can be
    (line breaks and a data: URL prefix allowed) is refused before it is decoded."""
    if len(text) > base64_chars(limit) * 78 // 76 + 256:
        raise InputError(field, f"{field} is {len(text)} characters; this model's inputs are at most {limit} bytes (GET /info)")
    return _sized(b64_png(field, text), limit, field)


def _sized(data: bytes, limit: int, field: str) -> bytes:
    if len(data) > limit:
        raise InputError(field, f"{field} is {len(data)} bytes; this model's inputs are at most {limit} bytes (GET /info)")
    return data


def resolve_chain(
    state: ServerState,
    sampler: str | None,
    steps: int | None,
    eta: float | None,
    spacing: str | None,
    clip: bool | None,
    where: str = "body",
    **edit: Any,
) -> ChainSpec:
    """A request's chain: its own fields, else the server's defaults, else the model's; 422 naming the
    field. ``edit``: an edit's options (``edit_options``), passed to ``LoadedModel.chain``."""
    assert state.model is not None
    settings = state.settings
    sampler, steps, spacing = state.model.own_chain(sampler, steps, spacing)  # a distilled model's own chain
    requested = sampler
    sampler = sampler or (DEFAULT_INPAINTING_SAMPLER if edit.get("repaint") else settings.default_sampler)
    try:
        if steps is None:
            # Algorithm 2 named without steps is the paper's chain (T steps; an edit: over the part it runs);
            # otherwise the server's default
            t = state.model.span(edit.get("strength", 1.0))
            steps = t if requested and sampler_rule(requested).full_chain_by_default else min(settings.default_steps or t, t)
        return state.model.chain(sampler, steps, eta, spacing, clip, default_spacing=settings.default_timestep_spacing, **edit)
    except ChainError as exc:
        values = {"steps": steps, "eta": eta, "timestep_spacing": spacing, "sampler": sampler, **edit}
        raise field_error(exc.field, str(exc), values.get(exc.field), where) from exc


def submit(state: ServerState, key: ImageKey, request: Request, sched: Scheduling, stream: bool = False, previews: int = 0) -> JobHandle:
    """Hand the images of ``key`` to the engine, within the client's quota (errors as ApiError); ``previews``: partial
    images of each (service/engine/previews.py)."""
    client = request.state.client  # set by RequestContextMiddleware: the one policy for quota and log
    job = Job(
        key.request,
        timeout_s=state.settings.request_timeout_s,
        client=client,
        request_id=request.state.request_id,
        priority=sched.priority,
        deadline_s=sched.deadline_s,
        created=getattr(request.state, "arrived", time.monotonic()),  # the deadline counts from arrival, reading the body included
        routed_before_drain=ROUTED_BEFORE_DRAIN.get(),  # a draining engine admits it (service/api/drain_admission.py)
        previews=previews,
    )
    calls = key.request.cost
    refused = state.clients.acquire(client, job.n, calls)
    if refused is not None:
        state.metrics.on_refused("client_quota")
        raise ApiError(429, f"too many {refused} in flight for this client", headers=retry_after(state))
    handle = JobHandle(job, asyncio.get_running_loop(), on_release=lambda: state.clients.release(client, job.n, calls), stream=stream)
    try:
        state.engine.submit(job)  # type: ignore[union-attr]  # prepare() checked it
    except EngineError as exc:  # refused: queue full, draining, stopped, a deadline it cannot meet
        state.clients.release(client, job.n, calls)
        raise engine_error(state, exc) from exc
    return handle


@dataclass
class Generated:
    """Images of a request, computed now or found in the response cache."""

    images: torch.Tensor
    job: Job | None  # None: from the cache
    shared: bool = False  # made by an identical request's job (service/api/in_flight.py)

    @property
    def x_cache(self) -> str:
        """The X-Cache header: hit (the response cache), shared (an identical request's job in flight), miss."""
        return "hit" if self.job is None else "shared" if self.shared else "miss"


def job_for(
    state: ServerState, key: ImageKey, request: Request, sched: Scheduling, stream: bool = False, previews: int = 0
) -> tuple[JobHandle, bool]:
    """A job making ``key``'s images: an identical request's in flight where it serves this one as well
    (shared: True; its previews are the sharer's where it makes as many: ``JobHandle.preview_reader``), else one
    submitted now with ``previews`` (errors as ApiError)."""
    if state.cache.enabled:
        arrived = getattr(request.state, "arrived", time.monotonic())
        promote = partial(state.engine.promote, priority=sched.priority)  # type: ignore[union-attr]  # prepare() checked it
        handle = state.in_flight.join(key, sched.deadline_s, arrived, stream, promote)
        if handle is not None:
            if stream:
                state.engine.stream_progress(handle.job)  # type: ignore[union-attr]  # prepare() checked it
            state.metrics.on_cache_lookup("shared")
            request.state.log_fields["cache"] = "shared"
            request.state.job = handle.job
            return handle, True
        state.metrics.on_cache_lookup("miss")
        request.state.log_fields["cache"] = "miss"
    handle = submit(state, key, request, sched, stream, previews)
    request.state.job = handle.job  # its phases are the request's span's children (service/tracing.py)
    if state.cache.enabled:  # identical requests may share it, a retry within the grace too; its images are kept
        handle.grace_s = state.settings.retry_grace_s
        state.in_flight.add(key, handle)
        handle.done.add_done_callback(lambda _: _keep(state, key, handle.job))
    return handle, False


def _keep(state: ServerState, key: ImageKey, job: Job) -> None:
    """A finished job's images into the response cache, whoever still waits: one that ends in a retry's grace,
    while nobody waits, answers the retry that comes after it."""
    if job.error is None and job.images is not None:
        state.cache.put(key, job.images)


def cached_images(state: ServerState, key: ImageKey, request: Request) -> torch.Tensor | None:
    """The images of ``key`` if the response cache holds them (a hit is counted here, a miss or a shared job by ``job_for``)."""
    asked = key.request
    request.state.log_fields.update({"seed": asked.seed, "batch_size": asked.n, "steps": asked.chain.steps, "sampler": asked.chain.sampler}
                                    | ({"first_image": asked.first} if asked.first else {}))  # fmt: skip
    if not state.cache.enabled:
        return None
    images = state.cache.get(key)
    if images is not None:
        state.metrics.on_cache_lookup("hit")
        request.state.log_fields["cache"] = "hit"
    return images


async def generate_images(state: ServerState, key: ImageKey, request: Request, sched: Scheduling) -> Generated:
    """The images of ``key``: from the response cache, else from the engine (then cached)."""
    cached = cached_images(state, key, request)
    if cached is not None:
        return Generated(cached, None)
    handle, shared = job_for(state, key, request, sched)
    job = await handle.wait(request.is_disconnected)
    if job is None:  # this client went away (the job runs on for others sharing it, or a retry's grace)
        raise engine_error(state, Cancelled("the client went away"))
    return finished(state, key, job, shared)


def finished(state: ServerState, key: ImageKey, job: Job, shared: bool = False) -> Generated:
    """A job the engine has finished: ``key``'s images among its own (all of them, or a part's: service/api/in_flight.py;
    the response cache has them: ``job_for``), or its error as an ApiError."""
    if job.error is not None:
        raise engine_error(state, job.error)
    assert job.images is not None
    offset = key.request.first - job.request.first
    return Generated(job.images[offset : offset + key.request.n], job, shared)


async def images_or_not_modified(
    state: ServerState, key: ImageKey, media: str, request: Request, sched: Scheduling
) -> Generated | Response:
    """304 when the client already holds this answer (If-None-Match naming its ETag: no U-Net call, no
    encoding), else the images (``generate_images``)."""
    etag, if_none_match = key.etag(media), request.headers.get("if-none-match")
    if if_none_match and etag_matches(if_none_match, etag, held=key in state.cache):  # (the cache is looked up once without one)
        state.metrics.on_not_modified()
        request.state.log_fields["cache"] = "not_modified"
        request.state.outcome = "ok"
        return Response(status_code=304, headers={"ETag": etag})
    return await generate_images(state, key, request, sched)


async def answer(
    state: ServerState,
    key: ImageKey,
    media: str,
    request: Request,
    sched: Scheduling,
    encode: Callable[[Generated], object],
    wrap: Callable[[Any], Response],
) -> Response:
    """Every generation route's answer after ``prepare``: 304 when the client holds it, else the images (the
    response cache or the engine) ``encode``d off the event loop, ``wrap``ped in a response with ETag and X-Cache."""
    generated = await images_or_not_modified(state, key, media, request, sched)
    if isinstance(generated, Response):
        return generated
    response = wrap(await encode_off_loop(state, lambda: encode(generated), request))
    answered(state, generated)
    response.headers["ETag"] = key.etag(media)
    response.headers["X-Cache"] = generated.x_cache
    request.state.outcome = "ok"
    return response


def answered(state: ServerState, generated: Generated) -> None:
    """An answer is encoded: how long that took after its images is what later deadlines keep (the engine's reserve),
    counted once per job, by the request that started it (not for the cache's answers, nor a shared job's others)."""
    if generated.job is not None and not generated.shared:
        state.engine.answered(generated.job)  # type: ignore[union-attr]


async def encode_off_loop(state: ServerState, encode: Callable[[], object], request: Request) -> object:
    """Run an encoder (PNG / npy / JSON body) off the event loop; a failure is a 500 that says so."""
    try:
        return await asyncio.to_thread(_encode_now, state, encode)
    except Exception as exc:
        log.error("encoding the result failed", exc_info=exc, extra={"fields": {"stage": "encode", "request_id": request.state.request_id}})
        state.metrics.on_fault("encode", 1)
        raise ApiError(500, f"encoding the result failed ({type(exc).__name__}); the server log has the details") from exc


def _encode_now(state: ServerState, encode: Callable[[], object]) -> object:
    state.faults("encode")
    return encode()


def chain_fields(state: ServerState, key: ImageKey, cached: bool) -> dict[str, object]:
    """What every generation answer (ours and OpenAI's dialect) says of the chain that made its images."""
    return {
        **key.request.echoed(),
        "model": state.model.name if state.model else "",
        "fingerprint": key.model_fingerprint,
        "precision": state.precision,
        "cached": cached,
        "class_labels": class_names(state, key),
    }


def class_names(state: ServerState, key: ImageKey) -> list[str] | None:
    """The class name of each image of a class-conditional request (None for an unconditional one)."""
    labels = key.request.labels
    if labels is None or state.model is None:
        return None
    return [state.model.class_names[label] for label in labels]


def result_body(state: ServerState, key: ImageKey, generated: Generated, arrived: float, sched: Scheduling) -> GenerateResponse:
    """/generate's JSON answer (and the stream's result event): the chain, the PNGs, the timings."""
    job = generated.job
    if job is not None:  # a shared job may have started before this request arrived
        assert job.finished is not None and job.first_admitted is not None
        started = max(job.first_admitted, arrived)
        queue_wait, generation = started - arrived, job.finished - started
    else:
        queue_wait = generation = 0.0
    return GenerateResponse(
        **chain_fields(state, key, cached=job is None),
        priority=sched.priority,
        deadline_s=sched.deadline_s,
        batch_size=key.request.n,
        images=[base64.b64encode(png).decode() for png in image_pngs(generated.images)],
        timings=Timings(queue_wait_s=round(queue_wait, 6), generation_s=round(generation, 6), total_s=round(time.monotonic() - arrived, 6)),
    )

