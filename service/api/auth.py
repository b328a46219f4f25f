"""Optional bearer-token access control: off unless DDPM_API_TOKEN or DDPM_API_TOKEN_FILE is set.

A token file is read again when it changes (checked at most once a second, on a request that needs a token), so a
rotated secret takes effect without a restart: Kubernetes updates a mounted Secret in place, and until 2026-12-07 a
replica kept the token it started with (clients given the new one got 401 until it restarted). The file may hold
several tokens, one per line, for a rotation without a gap: add the new one, move the clients, remove the old. A change
that leaves the file unreadable or empty keeps the tokens accepted before it (a warning): neither an open server nor
one that refuses every client because of a write caught half-way.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from pathlib import Path

from fastapi import HTTPException

from service.file_identity import file_identity
from service.settings import Settings
from service.token_file import token_lines

log = logging.getLogger("ddpm.server")
RECHECK_S = 1.0  # how stale the file's tokens may be: one stat per second at most


class BearerTokens:
    """The tokens a client may send: DDPM_API_TOKEN's, or the lines of DDPM_API_TOKEN_FILE as the file is now."""

    def __init__(self, tokens: tuple[bytes, ...], file: Path | None = None) -> None:
        self.tokens, self.file = tokens, file
        self._identity = file_identity(file) if file is not None else None
        self._checked = time.monotonic()
        self._checking = threading.Lock()  # the check runs on the event loop and in the threadpool (sync dependencies)

    def accepts(self, given: bytes) -> bool:
        """Whether ``given`` is one of the tokens (each compared in constant time, every one compared)."""
        self._follow_file()
        accepted = False
        for token in self.tokens:
            accepted |= hmac.compare_digest(given, token)
        return accepted

    def _follow_file(self) -> None:
        now = time.monotonic()
        file = self.file
        if file is None or now - self._checked < RECHECK_S or not self._checking.acquire(blocking=False):
            return  # (another thread checks it now: the tokens as they are)
        try:
            self._checked = now
            self._reread(file)
        finally:
            self._checking.release()

    def _reread(self, file: Path) -> None:
        identity = file_identity(file)
        if identity == self._identity:
            return
        self._identity = identity
        try:
            tokens = _file_tokens(file)
        except ValueError as exc:
            log.warning("%s; the %d token(s) read before stay accepted", exc, len(self.tokens))
            return
        self.tokens = tokens
        log.info("DDPM_API_TOKEN_FILE %s changed: %d token(s) accepted now", file, len(tokens))


def _file_tokens(path: Path) -> tuple[bytes, ...]:
    tokens = tuple(dict.fromkeys(line.encode() for line in token_lines(path)))
    if not tokens:
        raise ValueError(f"DDPM_API_TOKEN_FILE {path} is empty")
    return tokens


def load_token(settings: Settings) -> BearerTokens | None:
    """The configured tokens, or None when access is open. A file wins over the variable; a file that cannot be read,
    or holds no token, fails the start."""
    if settings.api_token_file is not None:
        return BearerTokens(_file_tokens(settings.api_token_file), settings.api_token_file)
    if settings.api_token is not None:
        token = settings.api_token.get_secret_value().strip()
        if not token:
            raise ValueError("DDPM_API_TOKEN is set but empty")
        return BearerTokens((token.encode(),))
    return None


def check_token(expected: BearerTokens | None, authorization: str | None) -> None:
    """Raises 401 unless ``authorization`` is ``Bearer <one of the tokens>`` (compared in constant time)."""
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not expected.accepts(given.strip().encode()):
        raise HTTPException(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
