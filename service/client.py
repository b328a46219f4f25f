"""A Python client of ddpm-serve, sync (:class:`Client`) and async (:class:`AsyncClient`).

    from service.client import Client
    with Client("http://127.0.0.1:8000") as client:             # token: DDPM_API_TOKEN, if set
        result = client.generate(seed=0, n=16, on_event=print)  # events: queued, progress
        result.save_grid("grid.png")                             # or result.array(): (N, C, H, W) in [0, 1]

A 503 (not ready, draining, queue full) or 429 (this client's images in flight) is retried after
the server's Retry-After, up to ``max_retries`` times; so is a refused connection (a replica
restarting). Retrying is safe: an image is a pure function of the request. Other errors raise
:class:`ServerError` with the server's status and message. ``on_event`` switches to the streaming
endpoint and receives its events: ``queued`` ({images_ahead, ...}) and ``progress`` ({steps_done, total}).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DEFAULT_URL = "http://127.0.0.1:8000"
EventHandler = Callable[[str, dict[str, Any]], None]
RETRY_STATUSES = (429, 503)


class ServerError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Generation:
    """A finished request: one PNG per image (k = 0..n-1) and the server's description of the chain."""

    pngs: list[bytes]
    meta: dict[str, Any] = field(default_factory=dict)  # seed, steps, sampler, eta, timestep_spacing, model, precision, cached, timings

    def array(self) -> np.ndarray:
        """(N, C, H, W) float32 in [0, 1]: the PNGs' 8-bit pixels / 255."""
        from PIL import Image

        images = [np.asarray(Image.open(io.BytesIO(png))) for png in self.pngs]
        stacked = np.stack([im if im.ndim == 3 else im[..., None] for im in images]).astype(np.float32) / 255.0
        return stacked.transpose(0, 3, 1, 2)

    def save(self, path: str | Path, ncols: int | None = None) -> Path:
        """``.npy``: the array; anything else: a PNG grid of the images."""
        path = Path(path)
        if path.suffix == ".npy":
            np.save(path, self.array())
            return path
        import torch

        from ddpm.grid import make_grid

        images = torch.from_numpy(self.array()) * 2 - 1  # make_grid takes [-1, 1]
        make_grid(images, ncols).save(path, format="PNG")
        return path


def request_body(seed: int, n: int, **chain: Any) -> dict[str, Any]:
    return {"seed": seed, "batch_size": n, **{k: v for k, v in chain.items() if v is not None}}


def _token(token: str | None) -> str | None:
    if token is not None:
        return token
    if os.environ.get("DDPM_API_TOKEN_FILE"):
        return Path(os.environ["DDPM_API_TOKEN_FILE"]).read_text().strip()
    return os.environ.get("DDPM_API_TOKEN") or None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error(response: httpx.Response) -> ServerError:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return ServerError(response.status_code, str(detail))


def _retry_delay(response: httpx.Response | None, attempt: int, max_wait_s: float) -> float:
    """Retry-After (seconds) when the server gave one, else exponential back-off from 0.5 s."""
    value = response.headers.get("retry-after") if response is not None else None
    try:
        delay = float(value) if value is not None else 0.5 * 2**attempt
    except ValueError:
        delay = 0.5 * 2**attempt
    return min(max(delay, 0.0), max_wait_s)


def _generation(body: dict[str, Any]) -> Generation:
    images = body.pop("images")
    return Generation([base64.b64decode(png) for png in images], body)


class SSEReader:
    """Server-Sent Events from lines: ``feed`` returns (event, data) at each blank line; comments
    (the server's keep-alives) are skipped."""

    def __init__(self) -> None:
        self.event, self.data = "message", []  # type: ignore[var-annotated]

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line == "":
            if not self.data:
                return None
            out = (self.event, json.loads("\n".join(self.data)))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def _stream_result(events: Iterable[tuple[str, dict[str, Any]]], on_event: EventHandler) -> Generation:
    for name, data in events:
        if name == "result":
            return _generation(data)
        if name == "error":
            raise ServerError(int(data.get("status", 500)), str(data.get("detail", "")))
        on_event(name, data)
    raise ServerError(502, "the stream ended without a result")


class _Connection:
    """What both clients hold: the HTTP client (token, timeout, transport) and the retry policy."""

    def __init__(self, http_class: type, url: str, token: str | None, timeout_s: float, max_retries: int, max_wait_s: float,
                 transport: object) -> None:  # fmt: skip
        self.max_retries, self.max_wait_s = max_retries, max_wait_s
        self._http = http_class(base_url=url, headers=_headers(_token(token)), timeout=timeout_s, transport=transport)


class Client(_Connection):
    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout_s: float = 900.0,
        max_retries: int = 5,
        max_wait_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(httpx.Client, url, token, timeout_s, max_retries, max_wait_s, transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def info(self) -> dict[str, Any]:
        return self._call(lambda: self._http.get("/info"), lambda r: r.json())

    def generate(self, seed: int = 0, n: int = 1, *, on_event: EventHandler | None = None, **chain: Any) -> Generation:
        """Images k = 0..n-1 of ``seed``; ``chain``: steps, sampler, eta, timestep_spacing, clip_denoised, and for a
        class-conditional model class_label and guidance_scale (the request fields of POST /generate)."""
        body = request_body(seed, n, **chain)
        if on_event is None:
            return self._call(lambda: self._http.post("/generate", json=body), lambda r: _generation(r.json()))
        return self._call(lambda: self._http.stream("POST", "/generate/stream", json=body), lambda r: self._read_stream(r, on_event))

    def _read_stream(self, response: httpx.Response, on_event: EventHandler) -> Generation:
        reader = SSEReader()
        return _stream_result((ev for line in response.iter_lines() if (ev := reader.feed(line)) is not None), on_event)

    def _call(self, send: Callable[[], Any], read: Callable[[httpx.Response], Any]) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                response = send()
                if isinstance(response, httpx.Response):
                    response.read()
                    return self._answer(response, read, attempt)
                with response as streamed:  # a stream: read it while it is open
                    if streamed.status_code >= 400:
                        streamed.read()
                    return self._answer(streamed, read, attempt)
            except _Retry as retry:
                time.sleep(retry.delay)
            except httpx.ConnectError:
                if attempt == self.max_retries:
                    raise
                time.sleep(_retry_delay(None, attempt, self.max_wait_s))
        raise AssertionError("unreachable")

    def _answer(self, response: httpx.Response, read: Callable[[httpx.Response], Any], attempt: int) -> Any:
        if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
            raise _Retry(_retry_delay(response, attempt, self.max_wait_s))
        if response.status_code >= 400:
            raise _error(response)
        try:
            return read(response)
        except ServerError as exc:  # a stream's error event: 503 is as retryable as a 503 answer
            if exc.status in RETRY_STATUSES and attempt < self.max_retries:
                raise _Retry(_retry_delay(None, attempt, self.max_wait_s)) from exc
            raise


class _Retry(Exception):
    def __init__(self, delay: float) -> None:
        self.delay = delay


class AsyncClient(_Connection):
    """:class:`Client` for asyncio: the same methods, awaited (``transport``: an httpx.AsyncBaseTransport)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 900.0, max_retries: int = 5,
                 max_wait_s: float = 60.0, transport: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        super().__init__(httpx.AsyncClient, url, token, timeout_s, max_retries, max_wait_s, transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def info(self) -> dict[str, Any]:
        return await self._call("GET", "/info", None, None)

    async def generate(self, seed: int = 0, n: int = 1, *, on_event: EventHandler | None = None, **chain: Any) -> Generation:
        body = request_body(seed, n, **chain)
        if on_event is None:
            return _generation(await self._call("POST", "/generate", body, None))
        return await self._call("POST", "/generate/stream", body, on_event)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None, on_event: EventHandler | None) -> Any:
        for attempt in range(self.max_retries + 1):
            retry_after: httpx.Response | None = None
            try:
                async with self._http.stream(method, path, json=body) as response:
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        retry_after = response
                    elif response.status_code >= 400:
                        await response.aread()
                        raise _error(response)
                    elif on_event is None:
                        return json.loads(await response.aread())
                    else:
                        reader, events = SSEReader(), []
                        async for line in response.aiter_lines():
                            event = reader.feed(line)
                            if event is None:
                                continue
                            if event[0] in ("result", "error"):
                                events.append(event)
                                break
                            on_event(*event)
                        try:
                            return _stream_result(events, on_event)
                        except ServerError as exc:
                            if exc.status not in RETRY_STATUSES or attempt == self.max_retries:
                                raise
            except httpx.ConnectError:
                if attempt == self.max_retries:
                    raise
            await asyncio.sleep(_retry_delay(retry_after, attempt, self.max_wait_s))
        raise AssertionError("unreachable")
