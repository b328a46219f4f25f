"""Cross-origin calls from a browser app on another origin (a front end on http://localhost:5173 calling this
server on :8000): CORS headers for the origins ``DDPM_CORS_ALLOW_ORIGINS`` names, by Starlette's middleware.
Without the setting there are none, and a browser lets only pages of this server's own origin (the web editor
at ``/``) read its answers."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

# what a browser app may read of an answer besides the body; it may send any header (OpenAI's JavaScript SDK sends
# its own X-Stainless-* headers: a fixed list would fail its preflight)
EXPOSED_HEADERS = ["etag", "x-request-id", "retry-after", "x-cache"]


def parse_origins(text: str) -> tuple[str, ...]:
    """``DDPM_CORS_ALLOW_ORIGINS``: comma-separated origins (``scheme://host[:port]``, a trailing slash dropped) or
    ``*``; ValueError naming one that is not an origin (a path would never match: a browser sends none)."""
    origins = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item == "*":
            origins.append(item)
            continue
        parts = urlsplit(item.removesuffix("/"))
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
            raise ValueError(f"{item!r} is not an origin: scheme://host[:port], e.g. http://localhost:5173 (or *)")
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)


def allow_cross_origin(app: FastAPI, origins: tuple[str, ...]) -> None:
    """The outermost middleware, so that every answer carries the headers (a 413 or 503 the request middleware
    gives included: without them a browser shows a network error instead). Tokens travel in ``Authorization``,
    not cookies: no credentials mode."""
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS, max_age=600)  # fmt: skip
