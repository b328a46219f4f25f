"""For the orchestrator and the operator: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``
(Prometheus) and ``/`` (a page to try the model in a browser)."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import MetricsAuthorized, StateDep
from service.api.errors import documented
from service.api.page_policy import content_security_policy
from service.api.strict_json import StrictJSONRoute

INDEX_HTML = Path(__file__).resolve().parent.parent / "static" / "index.html"
router = APIRouter(route_class=StrictJSONRoute)


@router.get("/healthz", responses=documented(503), summary="The process can serve (or is still starting): 503 once it never can")
async def healthz(state: StateDep) -> JSONResponse:
    fatal = state.fatal_reason()
    if fatal is not None:
        return JSONResponse({"status": "failed", "detail": fatal}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses=documented(503), summary="Model loaded and warmed up, not draining")
async def readyz(state: StateDep) -> JSONResponse:
    reason = state.not_ready_reason()
    if reason is None and state.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready", "detail": reason or "starting"}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, responses=documented(401), summary="Prometheus metrics (text format)")
async def metrics(state: StateDep, _: MetricsAuthorized) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@functools.cache
def _page() -> tuple[str, str]:
    """The page and its policy, read and hashed once (the file is part of the installed code)."""
    html = INDEX_HTML.read_text(encoding="utf-8")
    return html, content_security_policy(html)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "X-Frame-Options": "DENY"})
