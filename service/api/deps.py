"""The routes' dependencies, in one place: the replica's state and access control."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
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
