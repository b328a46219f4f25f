"""The Server-Sent Events of ``POST /generate/stream``: ``queued`` (with the images ahead), ``progress``
{steps_done, total, fraction}, ``preview`` {image_index, preview_index, image} where the request asked for
``previews``, keep-alive comments while nothing moves, then ``result`` or ``error``.

The stream's HTTP status is 200 from its first byte; what it ended with is recorded as the request's
outcome (``request.state.outcome`` and ``outcome_code``) for the access log and the metrics.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import Request
from fastapi.encoders import jsonable_encoder

from ddpm.grid import image_pngs
from service.api.errors import ApiError
from service.api.generation import Generated, Scheduling, answered, encode_off_loop, finished, result_body
from service.api.job_handle import JobHandle
from service.api.preview_log import PreviewReader
from service.response_cache import ImageKey
from service.server_state import ServerState


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def preview_files(
    state: ServerState, request: Request, reader: PreviewReader, encode: Callable[[torch.Tensor], list[bytes]] = image_pngs
) -> list[tuple[int, int, str]]:
    """The partial images of the request's own images that came (service/engine/previews.py) as (image index,
    preview index, base64 file: PNG, or what ``encode`` makes), encoded off the event loop."""
    taken = reader.take()
    if not taken:
        return []
    files = await encode_off_loop(state, lambda: encode(torch.stack([image for _, _, image in taken])), request)
    return [(k, index, base64.b64encode(file).decode()) for (k, index, _), file in zip(taken, files, strict=True)]  # type: ignore[arg-type]


def _queued(key: ImageKey, ahead: int, cached: bool) -> str:
    return sse("queued", {"batch_size": key.request.n, "steps": key.request.chain.steps, "images_ahead": ahead, "cached": cached})


class ProgressStream:
    """The events of one request, from the response cache (``handle`` None) or from its engine job."""

    def __init__(
        self,
        state: ServerState,
        key: ImageKey,
        request: Request,
        arrived: float,
        handle: JobHandle | None,
        sched: Scheduling,
        shared: bool = False,  # the job of an identical request in flight, or one making more (service/api/in_flight.py)
        previews: int = 0,  # preview events of each image asked for
    ) -> None:
        self.state, self.key, self.request, self.arrived, self.handle, self.sched = state, key, request, arrived, handle, sched
        self.shared = shared
        self.previews = None if handle is None else handle.preview_reader(key.request, previews)
        request.state.outcome, request.state.outcome_code = "cancelled", 499  # until the stream says otherwise

    def _ended(self, error: ApiError | None) -> None:
        status = self.request.state
        status.outcome, status.outcome_code = ("ok", 200) if error is None else (error.outcome, error.status_code)

    async def _result(self, generated: Generated) -> AsyncIterator[str]:
        state, key = self.state, self.key
        try:
            body = await encode_off_loop(
                state, lambda: jsonable_encoder(result_body(state, key, generated, self.arrived, self.sched)), self.request
            )
        except ApiError as exc:
            self._ended(exc)
            yield sse("error", {"status": exc.status_code, "detail": exc.detail})
        else:
            answered(state, generated)  # a stream's answer time counts toward the reserve like any other's
            self._ended(None)
            yield sse("result", body)

    async def events(self, cached: Generated | None) -> AsyncIterator[str]:
        if self.handle is None:  # from the cache
            assert cached is not None
            yield _queued(self.key, 0, True)
            async for chunk in self._result(cached):
                yield chunk
            return
        try:
            try:
                async for chunk in self._while_running(self.handle):
                    yield chunk
                generated = finished(self.state, self.key, await self.handle.done, self.shared)
            except ApiError as error:
                self._ended(error)
                yield sse("error", {"status": error.status_code, "detail": error.detail})
                return
            async for chunk in self._result(generated):
                yield chunk
        finally:
            if not self.handle.done.done():  # the client went away mid-stream (the job runs on for others sharing it)
                self.handle.leave()

    async def _while_running(self, handle: JobHandle) -> AsyncIterator[str]:
        """queued, progress and keep-alives until the job is done."""
        engine, job, keepalive_s = self.state.engine, handle.job, self.state.settings.sse_keepalive_s
        assert engine is not None
        ahead = engine.images_ahead(job)
        yield _queued(self.key, ahead or 0, False)
        last_write = time.monotonic()
        own, whole = self.key.request.n, job.n  # a request for part of a job (service/api/in_flight.py) counts its part's steps
        async for ev in handle.events(tick_s=min(1.0, keepalive_s)):
            previews = await self._previews()
            if previews:
                yield previews
                last_write = time.monotonic()
            if ev is not None:
                done, total = ev.steps_done * own // whole, ev.total * own // whole
                chunk = sse("progress", {"steps_done": done, "total": total, "fraction": round(ev.steps_done / ev.total, 4)})
            else:
                now_ahead = engine.images_ahead(job)
                if now_ahead is not None and now_ahead != ahead:  # moved up in the queue
                    ahead = now_ahead
                    chunk = _queued(self.key, ahead, False)
                elif time.monotonic() - last_write >= keepalive_s:
                    chunk = ": keep-alive\n\n"  # a comment line: SSE clients ignore it, proxies see traffic
                else:
                    continue
            last_write = time.monotonic()
            yield chunk
        previews = await self._previews()  # those that came with the last calls
        if previews:
            yield previews

    async def _previews(self) -> str:
        """The previews that came, as events in one write (a client that left is seen at the next, not after one write
        per image)."""
        assert self.previews is not None
        return "".join(sse("preview", {"image_index": k, "preview_index": index, "image": png})
                       for k, index, png in await preview_files(self.state, self.request, self.previews))  # fmt: skip
