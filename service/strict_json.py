"""Strict JSON request bodies: duplicate keys and non-finite numbers are refused (422 naming the field).

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, RFC 8259 §6), turns
``1e400`` into ``inf``, and lets the last of two equal keys win (``{"seed": -1, "seed": 3}`` runs seed
3). A strict API refuses all three. ``StrictJSONRoute`` parses the body this way before FastAPI does
and hands FastAPI the parsed value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

NON_FINITE_MSG = "must be a finite number (NaN, Infinity and numbers beyond the float range are not JSON)"


class _NonFinite:
    def __init__(self, text: str) -> None:
        self.text = text


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _find_non_finite(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str] | None:
    if isinstance(value, _NonFinite):
        return loc, value.text
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _find_non_finite(item, (*loc, key))
        if found is not None:
            return found
    return None


def loads_strict(body: bytes) -> Any:
    """``json.loads`` that raises RequestValidationError for duplicate keys and non-finite numbers
    (other syntax errors stay ``json.JSONDecodeError``, which FastAPI reports itself)."""
    try:
        value = json.loads(body, object_pairs_hook=_object, parse_constant=_NonFinite, parse_float=_float)
    except _DuplicateKey as exc:
        raise RequestValidationError(
            [{"type": "duplicate_key", "loc": ("body", exc.key), "msg": "appears more than once in the JSON object", "input": None}]
        ) from None
    found = _find_non_finite(value)
    if found is not None:
        loc, text = found
        raise RequestValidationError([{"type": "finite_number", "loc": ("body", *loc), "msg": NON_FINITE_MSG, "input": text}])
    return value


def finite_jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its text (so an error echo never fails)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_jsonable(v) for v in value]
    return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by ``loads_strict`` first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            if _is_json(request.headers.get("content-type", "application/json")):
                body = await request.body()
                if body:
                    try:
                        request._json = loads_strict(body)  # Starlette's cache of request.json(): FastAPI reads it
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        pass  # FastAPI parses it again and answers its own 422 / 400
            return await handler(request)

        return strict_handler
