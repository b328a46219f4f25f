"""OpenAI's image streaming (``stream: true`` on ``/v1/images/generations`` and ``/v1/images/edits``), as the
official client reads it (``client.images.generate(..., stream=True, partial_images=2)``):

- ``image_generation.partial_image`` (``image_edit.partial_image``) while the chain runs: a preview of an image,
  the model's prediction of x_0 after part of its calls (service/engine/previews.py), ``partial_image_index``
  counting from 0 per image;
- ``image_generation.completed`` (``image_edit.completed``) for each image once all are made;
- an ``error`` event, ``{"error": {message, type, param, code}}``, which the client raises as ``APIError``.

Each event carries ``image_index`` too (this server's: OpenAI's events have none, and a request may ask for
several images). Keep-alive comments while nothing moves, as ``/generate/stream``. The stream's status is 200
from its first byte; what it ended with is the request's outcome for the access log and the metrics.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import Request

from ddpm.grid import image_pngs
from service.api.errors import ApiError, openai_error_body
from service.api.generation import Generated, Scheduling, answered, chain_fields, encode_off_loop, finished
from service.api.job_handle import JobHandle
from service.api.progress_stream import preview_files, sse
from service.response_cache import ImageKey
from service.server_state import ServerState

NO_TOKENS = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0, "total_tokens": 0}


class OpenAIImageStream:
    """The events of one streamed request, from the response cache (``handle`` None) or its engine job. ``kind``:
    ``image_generation`` or ``image_edit``; ``size`` and ``quality`` as the answer states them."""

    def __init__(self, state: ServerState, key: ImageKey, request: Request, handle: JobHandle | None, sched: Scheduling,
                 kind: str, size: str, quality: str, output_format: str = "png",
                 encode: Callable[[torch.Tensor], list[bytes]] = image_pngs, shared: bool = False,
                 partial_images: int = 0) -> None:  # fmt: skip
        self.state, self.key, self.request, self.handle, self.sched = state, key, request, handle, sched
        self.kind, self.shared, self.encode = kind, shared, encode
        self.previews = None if handle is None else handle.preview_reader(key.request, partial_images)
        self.fields = {"size": size, "quality": quality, "background": "opaque", "output_format": output_format}
        request.state.outcome, request.state.outcome_code = "cancelled", 499  # until the stream says otherwise

    def _event(self, name: str, data: dict[str, object]) -> str:
        return sse(f"{self.kind}.{name}", {"type": f"{self.kind}.{name}", **data})

    def _error(self, error: ApiError) -> str:
        self.request.state.outcome, self.request.state.outcome_code = error.outcome, error.status_code
        return sse("error", openai_error_body(error.status_code, str(error.detail), error.param, error.code))  # as the routes answer it

    async def events(self, cached: torch.Tensor | None) -> AsyncIterator[str]:
        if self.handle is None:  # from the cache: no preview to show
            assert cached is not None
            generated = Generated(cached, None)
        else:
            try:
                async for chunk in self._while_running(self.handle):
                    yield chunk
                generated = finished(self.state, self.key, await self.handle.done, self.shared)
            except ApiError as error:
                yield self._error(error)
                return
            finally:
                if not self.handle.done.done():  # the client went away mid-stream (the job runs on for others sharing it)
                    self.handle.leave()
        try:
            pngs = await encode_off_loop(self.state, lambda: self.encode(generated.images), self.request)
        except ApiError as error:
            yield self._error(error)
            return
        answered(self.state, generated)
        extra = chain_fields(self.state, self.key, generated.job is None)
        created = int(time.time())
        self.request.state.outcome, self.request.state.outcome_code = "ok", 200
        yield "".join(self._event("completed", {"b64_json": base64.b64encode(png).decode(), "created_at": created, **self.fields,
                                                "usage": NO_TOKENS, "image_index": k, **extra})
                      for k, png in enumerate(pngs))  # type: ignore[arg-type]  # one write

    async def _while_running(self, handle: JobHandle) -> AsyncIterator[str]:
        """Partial images and keep-alives until the job is done (then the previews that came with its last calls)."""
        keepalive_s = self.state.settings.sse_keepalive_s
        last_write = time.monotonic()
        async for _ in handle.events(tick_s=min(1.0, keepalive_s)):
            previews = await self._previews()
            if previews:
                yield previews
                last_write = time.monotonic()
            elif time.monotonic() - last_write >= keepalive_s:
                last_write = time.monotonic()
                yield ": keep-alive\n\n"  # a comment line: SSE clients ignore it, proxies see traffic
        previews = await self._previews()  # those that came with the last calls
        if previews:
            yield previews

    async def _previews(self) -> str:
        """The partial images that came, as events in one write."""
        assert self.previews is not None
        created = int(time.time())
        taken = await preview_files(self.state, self.request, self.previews, self.encode)
        return "".join(self._event("partial_image", {"b64_json": png, "created_at": created, **self.fields,
                                                     "partial_image_index": index, "image_index": k})
                       for k, index, png in taken)  # fmt: skip
