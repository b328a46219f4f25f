"""A Python client of ddpm-serve, sync (:class:`Client`) and async (:class:`AsyncClient`).

    from service.client import Client
    with Client("http://127.0.0.1:8000") as client:             # token: DDPM_API_TOKEN, if set
        result = client.generate(seed=0, n=16, on_event=print)  # events: queued, progress
        result.save("grid.png")                                  # or result.array(): (N, C, H, W) in [0, 1]

A 503 (not ready, draining, queue full) or 429 (this client's images in flight) is retried after
the server's Retry-After, up to ``max_retries`` times; so is a refused connection (a replica
restarting), and a load balancer's 502 (every replica behind it restarting). Retrying is safe: an
image is a pure function of the request. ``on_retry(why, n, seconds)`` hears of each retry before its
wait. ``on_event`` switches to the streaming endpoint and receives its events: ``queued``
({images_ahead, ...}) and ``progress`` ({steps_done, total}).

A client must not hang on, or be blown up by, a server that misbehaves:

- ``timeout_s`` is the deadline of a whole call (connecting, waiting, reading, retries included),
  not of each read: a server that stalls, trickles bytes or streams events for ever is cut off then.
- ``max_response_bytes`` bounds what one answer may hold (a stream: all of its bytes), and
  ``max_events`` the events of one stream: a huge or endless answer is refused while it arrives,
  never buffered whole.
- ``Retry-After`` is read as RFC 9110 §10.2.3 defines it (whole seconds or an HTTP-date); anything
  else (``nan``, ``-1``, ``inf``) falls back to the client's own back-off, never an exception.
- Everything that can go wrong is a :class:`ClientError` with a message: :class:`ServerError` (the
  server answered an error status, or a stream's error event: ``status``, ``detail``),
  :class:`BadAnswer` (an answer this client cannot read: not JSON, no images, bad base64, too
  large), :class:`CallTimeout` (the deadline passed) and :class:`Unreachable` (no connection).

One implementation serves both: :class:`Client` runs :class:`AsyncClient`'s calls on a private
event loop (in a helper thread when the caller is itself inside a running loop).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import html
import json
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx

from service.api.trace_context import parse_traceparent
from service.client_proxy import environment_proxy
from service.client_results import BadAnswer, CallTimeout, ClientError, EventHandler, Generation, ServerError, Unreachable
from service.client_tls import speaks_tls, tls_failure
from service.token_file import token_lines

if TYPE_CHECKING:
    from service.generation_folder import FolderResult

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 900.0  # above the server's default request deadline (600 s) plus a queue wait
DEFAULT_MAX_RESPONSE_BYTES = 256 * 2**20  # 64 RGB 256x256 PNGs in base64 are ~20 MB
DEFAULT_MAX_EVENTS = 100_000  # a stream sends at most ~10 progress events a second
RetryHandler = Callable[[str, int, float], None]  # (why, which retry from 1, seconds until it): before each wait
RETRY_STATUSES = (429, 502, 503)  # 502: a gateway's "no replica reachable", a refused connection seen through a proxy
T = TypeVar("T")
__all__ = ["AsyncClient", "BadAnswer", "CallTimeout", "Client", "ClientError", "EventHandler", "Generation", "ServerError",
           "Unreachable"]  # fmt: skip


def _whole_progress(on_event: EventHandler, start: int, count: int, n: int) -> EventHandler:
    """A part's events as the whole request's: its progress offset by the images before it, out of all n."""

    def hear(name: str, data: dict[str, Any]) -> None:
        if name == "progress" and isinstance(data.get("total"), int | float) and isinstance(data.get("steps_done"), int | float):
            per_image = data["total"] / count  # image-steps of one image of this chain
            data = {**data, "steps_done": round(per_image * start + data["steps_done"]), "total": round(per_image * n)}
        on_event(name, data)

    return hear


def _joined(parts: list[Generation], first: int, n: int) -> Generation:
    """The parts' images in order, described as one request of n images from ``first`` (``requests``: how many)."""
    meta = {k: v for k, v in parts[0].meta.items() if k != "timings"}
    labels = [p.meta.get("class_labels") for p in parts]
    meta.update(batch_size=n, first_image=first, requests=len(parts), cached=all(bool(p.meta.get("cached")) for p in parts),
                class_labels=None if any(x is None for x in labels) else [name for x in labels for name in x])  # type: ignore[union-attr]  # fmt: skip
    return Generation([png for p in parts for png in p.pngs], meta)


def request_body(seed: int, n: int, **chain: Any) -> dict[str, Any]:
    return {"seed": seed, "batch_size": n, **{k: v for k, v in chain.items() if v is not None}}


def _token(token: str | None) -> str | None:
    if token is not None:
        return token
    if os.environ.get("DDPM_API_TOKEN_FILE"):  # the server's file may hold several during a rotation: the newest, last
        try:
            lines = token_lines(Path(os.environ["DDPM_API_TOKEN_FILE"]))
        except ValueError as exc:  # a traceback from `ddpm generate` before: a mistyped path, a binary file
            raise ClientError(str(exc)) from exc
        return lines[-1] if lines else None
    return os.environ.get("DDPM_API_TOKEN", "").strip() or None  # an env file's CR is no part of it


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait per RFC 9110 §10.2.3 (``delay-seconds`` = 1*DIGIT, or an HTTP-date); None when
    absent or not of that form (``nan``, ``-1``, ``1.5``, ``inf``, garbage)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - (now or datetime.now(timezone.utc))).total_seconds(), 0.0)


def _retry_delay(retry_after: str | None, attempt: int, max_wait_s: float) -> float:
    """Retry-After when the server gave a valid one, else exponential back-off from 0.5 s; at most max_wait_s."""
    delay = parse_retry_after(retry_after)
    return min(0.5 * 2**attempt if delay is None else delay, max_wait_s)


def _error_detail(status: int, body: bytes) -> ServerError:
    """The server's message: ``detail`` (ours), ``error.message`` (OpenAI's shape), else the text."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    detail: object = None
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(data, dict):
        detail = data.get("detail")
        if detail is None and isinstance(data.get("error"), dict):
            detail = data["error"].get("message")
    if detail is None:
        text = body.decode("utf-8", "replace").strip()
        detail = _html_title(text) or text[:500] or "(no message)"
    return ServerError(status, str(detail), [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else None)


def _html_title(text: str) -> str | None:
    """A proxy's HTML error page said by its title (nginx's "400 The plain HTTP request was sent to HTTPS port", a
    cloud balancer's "502 Bad Gateway"): the page's 9 lines of markup were the message before."""
    match = re.search(r"<title>(.*?)</title>", text[:4096], re.IGNORECASE | re.DOTALL)
    return " ".join(html.unescape(match.group(1)).split()) or None if match else None


def _json_object(body: bytes, what: str, status: int) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadAnswer(f"{what} is not JSON ({exc}): {body[:80]!r}", status) from None
    if not isinstance(data, dict):
        raise BadAnswer(f"{what} is not a JSON object: {body[:80]!r}", status)
    return data


def _generation(body: dict[str, Any], status: int = 200) -> Generation:
    images = body.pop("images", None)
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadAnswer(f"the answer has no list of base64 images (keys: {sorted(body)[:10]})", status)
    try:
        pngs = [base64.b64decode(png, validate=True) for png in images]
    except (binascii.Error, ValueError) as exc:
        raise BadAnswer(f"an image of the answer is not valid base64 ({exc})", status) from None
    return Generation(pngs, body)


class SSEReader:
    """Server-Sent Events from lines: ``feed`` returns (event, data) at each blank line; comments
    (the server's keep-alives) are skipped. Data that is not a JSON object is a BadAnswer."""

    def __init__(self) -> None:
        self.event, self.data = "message", []  # type: ignore[var-annotated]

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line == "":
            if not self.data:
                return None
            out = (self.event, _json_object("\n".join(self.data).encode(), f"the data of a {self.event!r} event", 200))
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


class _Limits:
    def __init__(self, max_response_bytes: int, max_events: int) -> None:
        self.max_response_bytes, self.max_events = max_response_bytes, max_events

    async def read(self, response: httpx.Response) -> bytes:
        """The whole body, refused as it arrives once it passes ``max_response_bytes``."""
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_response_bytes:
            message = f"the answer is {int(length)} bytes, over the client's limit of {self.max_response_bytes}"
            raise BadAnswer(message, response.status_code)
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > self.max_response_bytes:
                raise BadAnswer(f"the answer passed the client's limit of {self.max_response_bytes} bytes", response.status_code)
            chunks.append(chunk)
        return b"".join(chunks)

    async def events(self, response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The stream's events; its bytes (one unfinished line included) and events are bounded."""
        reader, buffer, total, count = SSEReader(), b"", 0, 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > self.max_response_bytes:
                raise BadAnswer(f"the stream passed the client's limit of {self.max_response_bytes} bytes", response.status_code)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                event = reader.feed(raw.removesuffix(b"\r").decode("utf-8", "replace"))
                if event is None:
                    continue
                count += 1
                if count > self.max_events:
                    raise BadAnswer(f"the stream sent over {self.max_events} events without a result", response.status_code)
                yield event


class _Retry(Exception):
    def __init__(self, delay: float, why: str) -> None:
        self.delay, self.why = delay, why


async def _pause(seconds: float) -> None:  # the retry wait (tests replace it)
    await asyncio.sleep(seconds)


class AsyncClient:
    """The client for asyncio (``transport``: an httpx async transport, e.g. ``httpx.MockTransport``)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 5,
        max_wait_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_events: int = DEFAULT_MAX_EVENTS,
        on_retry: RetryHandler | None = None,
        verify: ssl.SSLContext | bool = True,
        _persistent: bool = True,
    ) -> None:
        """``verify``: an ``ssl.SSLContext`` that trusts an https:// server's certificate (``ssl.create_default_context(
        cafile="ca.pem")``; the default trusts the system's and ``SSL_CERT_FILE``'s), False to check none."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, self.timeout_s, self.max_retries, self.max_wait_s = url, timeout_s, max_retries, max_wait_s
        self.limits = _Limits(max_response_bytes, max_events)
        self.on_retry = on_retry
        self._headers = {"Authorization": f"Bearer {t}"} if (t := _token(token)) else {}
        if parse_traceparent(traceparent := os.environ.get("TRACEPARENT", "").strip()) is not None:
            # the trace this process runs in, as OpenTelemetry's environment carrier names it (a traced CI job, a script
            # under otel-cli): the server's access line and span join it
            self._headers["traceparent"] = traceparent
        self._follows_file = token is None and bool(os.environ.get("DDPM_API_TOKEN_FILE"))  # re-read after a 401
        self._transport, self._verify = transport, verify
        self.proxy = environment_proxy(url) if transport is None else None
        self._http = self._new_http() if _persistent else None

    def _new_http(self) -> httpx.AsyncClient:
        # per-phase timeouts no longer than the call's own deadline (which _call enforces as a whole); the proxy the
        # environment names (service.client_proxy), or a transport of its own that reads no proxy from it
        route: dict[str, Any] = {"transport": self._transport}
        if self._transport is None:
            direct = {"transport": httpx.AsyncHTTPTransport(verify=self._verify)}
            route = {"proxy": self.proxy.url, "verify": self._verify} if self.proxy else direct
        try:
            return httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout_s, **route)
        except (ImportError, ValueError) as exc:  # a SOCKS proxy without socksio, a scheme httpx has no transport for
            host = urlsplit(self.url).hostname
            raise ClientError(f"cannot use the proxy {self.proxy}: {exc} (or set no_proxy={host} to go direct)") from None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def info(self, http: httpx.AsyncClient | None = None) -> dict[str, Any]:
        return await self._call(http, "GET", "/info", None, None)

    async def generate(
        self,
        seed: int = 0,
        n: int = 1,
        *,
        on_event: EventHandler | None = None,
        http: httpx.AsyncClient | None = None,
        per_request: int | None = None,
        **chain: Any,
    ) -> Generation:
        """Images k = first_image..first_image+n-1 of ``seed`` (first_image: 0 unless given); ``chain``: first_image,
        steps, sampler, eta, timestep_spacing, clip_denoised, and for a class-conditional model class_label and
        guidance_scale (the request fields of POST /generate). ``per_request``: at most this many images a request
        (the server's ``max_images_per_request``, GET /info): a larger ``n`` is asked for in consecutive parts, one
        after another, each with its own ``timeout_s``, and the answer is the one a single request would give (image
        k of a seed is the same whichever request asks for it); ``on_event``'s progress counts the whole."""
        if per_request is not None and per_request < 1:
            raise ValueError(f"per_request must be >= 1, got {per_request}")
        if per_request is None:
            body = request_body(seed, n, **chain)
            path = "/generate" if on_event is None else "/generate/stream"
            return await self._call(http, "POST", path, body, on_event)
        first, labels = chain.pop("first_image", None) or 0, chain.pop("class_label", None)
        parts: list[Generation] = []
        start = 0
        while start < n:
            count = min(per_request, n - start)
            part_labels = labels[start : start + count] if isinstance(labels, list) else labels  # one per image: this part's
            hear = None if on_event is None or count == n else _whole_progress(on_event, start, count, n)
            try:
                part = await self.generate(seed, count, on_event=hear or on_event, http=http, first_image=first + start,
                                           class_label=part_labels, **chain)  # fmt: skip
            except ServerError as exc:
                fit = exc.images_within_cost()
                if fit is None or fit >= count:
                    raise
                per_request = fit  # the chain costs more U-Net calls a request than the server allows: fewer images each
                continue
            parts.append(part)
            start += count
        return parts[0] if len(parts) == 1 else _joined(parts, first, n)

    async def generate_folder(
        self,
        folder: str | Path,
        seed: int = 0,
        n: int = 1,
        *,
        parallel: int = 1,
        per_request: int | None = None,
        on_event: EventHandler | None = None,
        http: httpx.AsyncClient | None = None,
        **chain: Any,
    ) -> FolderResult:
        """Images k = first_image..first_image+n-1 of ``seed`` as ``folder/NNNNNN.png`` (``service.generation_folder``):
        only those not there yet, in parts of at most ``per_request`` images, ``parallel`` requests at a time, each
        part written as it arrives; ``FolderRefused`` where the folder holds another chain's, model's or precision's."""
        from service.generation_folder import GenerationFolder, fill

        first = chain.pop("first_image", None) or 0
        return await fill(self, GenerationFolder.open(folder), seed, n, first=first, parallel=parallel, per_request=per_request,
                          on_event=on_event, http=http, **chain)  # fmt: skip

    async def _call(
        self, http: httpx.AsyncClient | None, method: str, path: str, body: dict[str, Any] | None, on_event: EventHandler | None
    ) -> Any:
        http = http or self._http
        assert http is not None
        try:
            return await asyncio.wait_for(self._attempts(http, method, path, body, on_event), self.timeout_s)
        except asyncio.TimeoutError:
            raise CallTimeout(f"no complete answer from {self.url}{path} within {self.timeout_s:g} s") from None

    async def _attempts(
        self, http: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None, on_event: EventHandler | None
    ) -> Any:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                return await self._attempt(http, method, path, body, on_event, retry_allowed=not last, attempt=attempt)
            except _Retry as retry:
                await self._wait(retry.why, attempt, retry.delay)
            except httpx.TimeoutException as exc:
                raise CallTimeout(f"no answer from {self.url}{path} within {self.timeout_s:g} s ({type(exc).__name__})") from None
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # refused: a replica restarting; a dropped or garbled connection: nothing was answered; but a certificate
                # or a scheme that is wrong stays wrong (service.client_tls)
                if (tls := await self._tls_mismatch(exc, attempt)) is not None:
                    raise Unreachable(tls) from exc
                if last:
                    raise Unreachable(f"cannot reach {self._route()}: {exc or type(exc).__name__}") from exc
                why = f"no connection to {self._route()} ({exc or type(exc).__name__})"
                await self._wait(why, attempt, _retry_delay(None, attempt, self.max_wait_s))
            except httpx.HTTPError as exc:
                raise Unreachable(f"cannot reach {self._route()}: {exc or type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    async def _tls_mismatch(self, exc: Exception, attempt: int) -> str | None:
        """A TLS failure no retry mends, or (once) an http:// URL whose server closed the request unanswered and speaks TLS."""
        if (why := tls_failure(exc, self.url)) is not None:
            return why
        direct = self._transport is None and self.proxy is None
        dropped = not isinstance(exc, httpx.ConnectError)  # accepted, then closed unanswered (reset, or before the body)
        if attempt == 0 and direct and dropped and await speaks_tls(self.url):
            return f"{self.url} speaks TLS (it closed a plain HTTP request unanswered): try https://{self.url[len('http://') :]}"
        return None

    def _route(self) -> str:
        """The server, and the proxy in between where there is one: a proxy that is down is not the server."""
        return self.url if self.proxy is None else f"{self.url} through the proxy {self.proxy}"

    async def _wait(self, why: str, attempt: int, delay: float) -> None:
        if self.on_retry is not None:  # a person at a terminal learns why nothing happens yet
            self.on_retry(why, attempt + 1, delay)
        await _pause(delay)

    def _token_changed(self, http: httpx.AsyncClient) -> bool:
        """After a 401: whether DDPM_API_TOKEN_FILE (where the token came from) holds another token now (rotated while
        this client lived: a long batch job), which then goes on ``http`` and every later call."""
        if not self._follows_file:
            return False
        try:
            token = _token(None)
        except ClientError:  # unreadable now (a UnicodeDecodeError went through before): the token it has, and the 401
            return False
        header = f"Bearer {token}"
        if token is None or header == self._headers.get("Authorization"):
            return False
        self._headers["Authorization"] = http.headers["Authorization"] = header
        return True

    async def _attempt(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        on_event: EventHandler | None,
        retry_allowed: bool,
        attempt: int,
    ) -> Any:
        async with http.stream(method, path, json=body) as response:
            status = response.status_code
            if status >= 400:
                error = _error_detail(status, await self.limits.read(response))
                if status in RETRY_STATUSES and retry_allowed:
                    raise _Retry(_retry_delay(response.headers.get("retry-after"), attempt, self.max_wait_s), str(error))
                if status == 401 and retry_allowed and self._token_changed(http):
                    raise _Retry(0.0, f"{error}; DDPM_API_TOKEN_FILE holds another token now: sent again with it")
                raise error
            if on_event is None:
                data = _json_object(await self.limits.read(response), "the answer", status)
                return data if path == "/info" else _generation(data, status)
            async for name, data in self.limits.events(response):
                if name == "result":
                    return _generation(data, status)
                if name == "error":
                    error = ServerError(_status_of(data), str(data.get("detail", "")))
                    if error.status in RETRY_STATUSES and retry_allowed:  # a 503 event is as retryable as a 503 answer
                        raise _Retry(_retry_delay(None, attempt, self.max_wait_s), str(error))
                    raise error
                on_event(name, data)
            raise BadAnswer("the stream ended without a result", status)


def _status_of(event: dict[str, Any]) -> int:
    status = event.get("status")
    return status if isinstance(status, int) and 100 <= status <= 599 else 500


class Client:
    """The synchronous client: :class:`AsyncClient`'s calls, each run to its end on a private loop.
    Takes :class:`AsyncClient`'s arguments (``timeout_s``, ``max_retries``, ``max_wait_s``, ``transport``,
    ``max_response_bytes``, ``max_events``, ``on_retry``, ``verify``)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, **options: Any) -> None:
        self._async = AsyncClient(url, token, **options, _persistent=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass  # each call opens and closes its own connections (an httpx pool belongs to one event loop)

    def info(self) -> dict[str, Any]:
        return self._run(lambda http: self._async.info(http))

    def generate(
        self, seed: int = 0, n: int = 1, *, on_event: EventHandler | None = None, per_request: int | None = None, **chain: Any
    ) -> Generation:
        """As :meth:`AsyncClient.generate`."""
        return self._run(lambda http: self._async.generate(seed, n, on_event=on_event, http=http, per_request=per_request, **chain))

    def generate_folder(self, folder: str | Path, seed: int = 0, n: int = 1, **options: Any) -> FolderResult:
        """As :meth:`AsyncClient.generate_folder`."""
        return self._run(lambda http: self._async.generate_folder(folder, seed, n, http=http, **options))

    def _run(self, call: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        async def once() -> T:
            async with self._async._new_http() as http:
                return await call(http)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(once())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside a running loop (a notebook)
            return pool.submit(asyncio.run, once()).result()
