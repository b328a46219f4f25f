"""Optional bearer-token access control: off unless DDPM_API_TOKEN or DDPM_API_TOKEN_FILE is set."""

from __future__ import annotations

import hmac

from fastapi import HTTPException

from service.settings import Settings


def load_token(settings: Settings) -> bytes | None:
    """The configured token, or None when access is open. A file wins over the variable."""
    if settings.api_token_file is not None:
        try:
            token = settings.api_token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read DDPM_API_TOKEN_FILE {settings.api_token_file}: {exc}") from exc
        if not token:
            raise ValueError(f"DDPM_API_TOKEN_FILE {settings.api_token_file} is empty")
        return token.encode()
    if settings.api_token is not None:
        token = settings.api_token.get_secret_value().strip()
        if not token:
            raise ValueError("DDPM_API_TOKEN is set but empty")
        return token.encode()
    return None


def check_token(expected: bytes | None, authorization: str | None) -> None:
    """Raises 401 unless ``authorization`` is ``Bearer <expected>`` (compared in constant time)."""
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise HTTPException(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
