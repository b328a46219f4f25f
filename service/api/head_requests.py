"""HEAD wherever GET is served (RFC 9110, section 9.1: a general-purpose server supports both): a load balancer's or
a monitor's health check may ask ``HEAD /healthz``, and FastAPI routes a ``GET`` route for GET alone (405 before).

A HEAD request goes to the routes as its GET; the status and headers (Content-Length, ETag, the request id) are
the GET's, and uvicorn's protocol, which still sees HEAD in its own scope, sends no body. The access log and the
request metrics see HEAD (they read the outer scope). A route that takes no GET answers 405 with its ``Allow``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # a copy: the server's scope keeps HEAD, and with it the empty body
        await self.app(scope, receive, send)
