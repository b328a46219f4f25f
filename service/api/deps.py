"""The routes' dependencies, in one place: the replica's state, access control and strict query strings."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import check_token
from service.server_state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]

# Declares the bearer scheme in the OpenAPI schema (so /docs has an Authorize button); the check
# itself is check_token's, which answers 401 in the server's own words.
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="DDPM_API_TOKEN (or DDPM_API_TOKEN_FILE); open when neither is set"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def require_token(request: Request, _: Credentials) -> None:
    check_token(request.app.state.api_token, request.headers.get("authorization"))


def require_metrics_token(request: Request, _: Credentials) -> None:
    if request.app.state.server.settings.metrics_require_token:
        check_token(request.app.state.api_token, request.headers.get("authorization"))


Authorized = Annotated[None, Depends(require_token)]
MetricsAuthorized = Annotated[None, Depends(require_metrics_token)]


def strict_query(request: Request) -> None:
    """A route's query string as strictly as a JSON body: a parameter the route does not take (``?step=5`` would
    answer the schedule without a chain, silently) or one given twice (which would count?) is 422, as an unknown
    or a duplicate JSON field is."""
    route = request.scope.get("route")
    taken = {p.alias for p in route.dependant.query_params} if route is not None and hasattr(route, "dependant") else set()
    given = Counter(name for name, _ in request.query_params.multi_items())
    takes = f"it takes {', '.join(sorted(taken)) or 'none'}"
    errors = [{"type": "extra_forbidden", "loc": ("query", name), "msg": f"not a parameter of this route ({takes})", "input": None}
              for name in given if name not in taken]  # fmt: skip
    errors += [{"type": "duplicate_parameter", "loc": ("query", name), "msg": "appears more than once in the query string", "input": None}
               for name, count in given.items() if count > 1 and name in taken]  # fmt: skip
    if errors:
        raise RequestValidationError(errors)


StrictQuery = Depends(strict_query)
