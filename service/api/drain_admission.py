"""Which requests a draining replica still serves: the first request of a connection it accepted before it
closed its listeners (``ServerState.routed_before_drain``). A load balancer routed that request here before the
replica left and does not re-send a POST that reached it, so a 503 would lose it; the replica serves it.

This ASGI middleware reads the connection facts ``service.api.http_protocol`` records in the request's
``scope["state"]`` and sets ``service.server_state.ROUTED_BEFORE_DRAIN`` for the request's task, which the
readiness check (``ServerState.refusal_reason``) and the engine's admission (``Job.routed_before_drain``) read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.server_state import ROUTED_BEFORE_DRAIN, ServerState


class DrainAdmissionMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.state.draining:
            facts = scope.get("state") or {}
            routed = self.state.routed_before_drain(facts.get("connection_opened"), facts.get("nth_on_connection"))
            token = ROUTED_BEFORE_DRAIN.set(routed)
            try:
                await self.app(scope, receive, send)
            finally:
                ROUTED_BEFORE_DRAIN.reset(token)
            return
        await self.app(scope, receive, send)
