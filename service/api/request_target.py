"""The absolute-form request target (``GET http://host/healthz HTTP/1.1``): RFC 9112 §3.2.2 has a server accept it,
though clients send it only to proxies (a client configured with this server as its HTTP proxy, some embedded
clients). uvicorn's h11 protocol hands the whole target over as the path, so every route answered 404, and a probe
sent so was not exempt from the connection limit. Here the target becomes its origin form (the path; the query
string is already apart) before anything routes, logs or counts it. The Host header is left as sent (the target's
authority should override it, §3.2.2; nothing here reads the host).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send


def _is_absolute(target: str) -> bool:
    return target[:8].lower().startswith(("http://", "https://"))


def origin_path(target: str) -> str:
    """The path of a request target in either form."""
    return (urlsplit(target).path or "/") if _is_absolute(target) else target


class AbsoluteFormMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_absolute(scope.get("path", "")):
            raw = scope.get("raw_path") or scope["path"].encode()
            scope["path"] = origin_path(scope["path"])
            scope["raw_path"] = urlsplit(raw).path or b"/"
        await self.app(scope, receive, send)
