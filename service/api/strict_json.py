"""Strict JSON request bodies, read only after the token: the order in which a POST is judged.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, RFC 8259 §6), turns
``1e400`` into ``inf``, and lets the last of two equal keys win (``{"seed": -1, "seed": 3}`` runs seed
3). A strict API refuses all three (422 naming the field). It also raises what is not a
``JSONDecodeError`` on hostile input: ``ValueError`` for an integer over Python's int-string limit
(4300 digits) and ``RecursionError`` for deep nesting; both are 422 here, never a 500. A ``\\udce9`` escape
alone (half of a UTF-16 surrogate pair) is valid JSON syntax but no Unicode character: Python keeps it in the string,
and the 422 that echoed it failed to encode as UTF-8, a 500; it is refused as what it is (422 naming the field).

``StrictJSONRoute`` judges a request in this order: the body's size (413, before any route:
``RequestContextMiddleware``), then the bearer token where the route requires one (401, before the
body is parsed at all: an anonymous caller learns nothing about the schema and costs no parsing, as
with OpenAI's and Triton's servers), then the media type of an upload route (415 unless multipart),
then the JSON (400 / 422), then the fields (422).
"""

from __future__ import annotations

import collections
import email.message
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, params
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from ddpm.names import is_text
from service.api.auth import check_token
from service.api.deps import require_token

MAX_DEPTH = 32  # no request of this API nests more than three levels; deeper JSON is refused unparsed
# no request of this API holds this many values: 4,096 class labels, a 32,000-character prompt of commas and
# quotes, and room; a body with more is refused unparsed (a 16 MiB array would take the event loop for seconds)
MAX_STRUCTURE = 100_000
OFF_LOOP_BYTES = 2**20  # bodies over this are parsed off the event loop
_NOT_SKELETON = bytes(b for b in range(256) if b not in b'"[]{}')
LONE_SURROGATE_MSG = "holds a \\uD800-\\uDFFF escape without its pair: not a Unicode character (RFC 8259 §8.2); send UTF-8 text"
NON_FINITE_MSG = "must be a finite number (NaN, Infinity and numbers beyond the float range are not JSON)"


class _NonFinite:
    def __init__(self, text: str) -> None:
        self.text = text


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key


class _LoneSurrogate(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        if not is_text(key):
            raise _LoneSurrogate(key)
        obj[key] = value
    return obj


def _float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _find_unfit(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str | None] | None:
    """Where the first non-finite number (and its text) or string with a lone surrogate (None) is."""
    if isinstance(value, _NonFinite):
        return loc, value.text
    if isinstance(value, str) and not is_text(value):
        return loc, None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _find_unfit(item, (*loc, key))
        if found is not None:
            return found
    return None


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count).

    Linear and in C but for a loop over the body's skeleton: escaped backslashes, then escaped quotes are
    removed (JSON pairs escapes left to right, as ``bytes.replace`` does), every byte but quotes and
    brackets is dropped, and the loop walks what is left (``MAX_STRUCTURE`` bytes at most, checked first)."""
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_SKELETON)
    depth = deepest = 0
    in_string = False
    for byte in skeleton:
        if byte == 0x22:  # quote
            in_string = not in_string
        elif in_string:
            continue
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:  # ] }
            depth -= 1
    return deepest


def structure_count(body: bytes) -> int:
    """Quotes, commas and opening brackets, inside strings or not: at least the JSON's count of values,
    counted in C (``bytes.count``) before anything is parsed."""
    return sum(body.count(c) for c in (b'"', b",", b"[", b"{"))


def _body_error(kind: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body",), "msg": message, "input": None}])


def loads_strict(body: bytes) -> Any:
    """``json.loads`` that raises RequestValidationError for duplicate keys, non-finite numbers, integers
    over Python's digit limit, bytes that are not text, more than ``MAX_STRUCTURE`` values and nesting
    deeper than ``MAX_DEPTH`` (other syntax errors stay ``json.JSONDecodeError``, which FastAPI reports
    itself). Linear time, in C but for a loop of at most ``MAX_STRUCTURE`` steps: a 16 MiB body holds the
    event loop for milliseconds (tests/test_large_bodies.py)."""
    if structure_count(body) > MAX_STRUCTURE:  # before parsing: millions of values hold the event loop for seconds
        raise _body_error("json_too_large", f"the JSON holds over {MAX_STRUCTURE} values, quotes or commas: no request of this API does")
    if nesting_depth(body) > MAX_DEPTH:  # before parsing: deep values also overflow the validator and its error echo
        raise _body_error("json_too_deep", f"the JSON is nested more than {MAX_DEPTH} levels deep")
    try:
        value = json.loads(body, object_pairs_hook=_object, parse_constant=_NonFinite, parse_float=_float)
        found = _find_unfit(value)
    except _DuplicateKey as exc:
        raise RequestValidationError(
            [{"type": "duplicate_key", "loc": ("body", exc.key), "msg": "appears more than once in the JSON object", "input": None}]
        ) from None
    except _LoneSurrogate as exc:
        found = (_escaped(exc.key),), None
    except RecursionError:
        raise _body_error("json_too_deep", "the JSON is nested too deeply to be a request of this API") from None
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as exc:  # a ValueError too (json.loads reads UTF-8, or UTF-16/32 by the first bytes)
        where = f"{exc.encoding.upper()}: {exc.reason} at byte {exc.start}"
        raise _body_error("json_invalid", f"the body does not decode as text ({where}); JSON is UTF-8 text (RFC 8259)") from None
    except ValueError as exc:  # int("9" * 5000): Python's int-string conversion limit
        raise _body_error("number_too_long", f"a number in the JSON is too long ({exc})") from None
    if found is not None:
        loc, text = found
        if text is None:
            loc = tuple(_escaped(k) if isinstance(k, str) else k for k in loc)
            raise RequestValidationError([{"type": "string_unicode", "loc": ("body", *loc), "msg": LONE_SURROGATE_MSG, "input": None}])
        raise RequestValidationError([{"type": "finite_number", "loc": ("body", *loc), "msg": NON_FINITE_MSG, "input": text}])
    return value


def _escaped(key: str) -> str:
    """A key as JSON would escape it (a lone surrogate as \\udce9): printable and encodable."""
    return key if is_text(key) else json.dumps(key)[1:-1]


ECHO_CHARS = 256  # an error echoes at most this much of a string input (a 16 MiB field is not sent back)


def finite_jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its text and long strings cut (so an error echo
    never fails and stays small)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: finite_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_jsonable(v) for v in value]
    return value


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def check_form(request: Request) -> None:
    """400 for a multipart body cut short (no closing boundary: the parser would take what came) and for
    a field sent twice (one of them would be used silently); ``[]`` fields are lists. The form parsed
    here is Starlette's cached one, the one the route reads."""
    message = email.message.Message()
    message["content-type"] = request.headers.get("content-type", "")
    boundary = message.get_param("boundary")
    body = await request.body()
    if isinstance(boundary, str) and boundary and b"--" + boundary.encode("latin-1") + b"--" not in body:
        raise HTTPException(400, "the multipart body ends without its closing boundary (--BOUNDARY--): it was cut short")
    form = await request.form()
    counts = collections.Counter(name for name, _ in form.multi_items())
    repeated = sorted(name for name, n in counts.items() if n > 1 and not name.endswith("[]"))
    if repeated:
        raise HTTPException(400, f"form field {repeated[0]!r} is sent more than once (one value per field; lists are 'name[]')")


def _requires(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _requires(d, call) for d in dependant.dependencies)


class StrictJSONRoute(APIRoute):
    """A route that checks the bearer token (where it requires one) before reading its body, and whose
    JSON body is parsed by ``loads_strict`` first."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        token_first = _requires(self.dependant, require_token)

        takes_form = any(isinstance(p.field_info, params.Form) for p in self.dependant.body_params)

        async def strict_handler(request: Request) -> Response:
            if token_first:  # 401 before the body is read (require_token checks it again, for the schema's sake)
                check_token(request.app.state.api_token, request.headers.get("authorization"))
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if takes_form and media != "multipart/form-data":  # an upload route: 415 before the body is read
                raise HTTPException(415, f"Content-Type must be multipart/form-data, got {media or 'none'!r}")
            if takes_form:
                await check_form(request)
            if _is_json(request.headers.get("content-type", "application/json")):
                body = await request.body()
                if body:
                    try:
                        # Starlette's cache of request.json(): FastAPI reads it. A large body is checked and parsed in a
                        # worker thread: each C step of it holds the GIL for tens of ms, and the loop runs between them
                        parsed = loads_strict(body) if len(body) <= OFF_LOOP_BYTES else await run_in_threadpool(loads_strict, body)
                        request._json = parsed
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        pass  # FastAPI parses it again and answers its own 422 / 400
            return await handler(request)

        return strict_handler
