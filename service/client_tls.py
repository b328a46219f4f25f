"""What a client says of a connection whose TLS failed, and which failures no retry mends.

Measured before (round seventeen, ``ddpm generate`` against nginx ending TLS with a self-signed certificate): an
untrusted certificate was retried like a replica restarting, five times over 15.5 s, and then said as "cannot reach
https://...: [SSL: CERTIFICATE_VERIFY_FAILED] ..." with no word of what mends it; an https:// URL on a plain HTTP
port was retried as well (``WRONG_VERSION_NUMBER``), and an http:// URL on ``ddpm serve``'s TLS port read as a
dropped connection, retried for 15.5 s too. A certificate, a protocol version or a scheme does not change between
retries: those fail at once here, saying what to change. A handshake cut short (the server restarting, its
handshake deadline) is still retried.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

# the reason OpenSSL gives a client that sent its hello to a server speaking plain HTTP (3.0; later releases)
PLAIN_HTTP_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})
CUT_SHORT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)  # a retry may find the server whole


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error beneath httpx's and httpcore's wrappers, if there is one."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tls_failure(exc: BaseException, url: str) -> str | None:
    """The message for a TLS failure that a retry cannot mend; None for any other error (retried as before)."""
    error = _ssl_error(exc)
    if error is None or isinstance(error, CUT_SHORT):
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        why = (error.verify_message or error.reason or str(error)).rstrip(".")
        if "expired" in why:
            mend = "the server's certificate must be renewed"
        elif "hostname" in why.lower() or "ip address mismatch" in why.lower():
            mend = "the URL must name a host the certificate names (or the certificate that host)"
        else:
            mend = "a private CA's certificate is trusted through SSL_CERT_FILE=/path/to/ca.pem (the Python client: verify=)"
        return f"{url}'s TLS certificate is not trusted: {why}; {mend}"
    reason = error.reason or str(error)
    if reason in PLAIN_HTTP_REASONS:
        return f"{url} does not speak TLS ({reason}): a server without a certificate speaks plain HTTP, try http://"
    return f"TLS with {url} failed: {reason}"


async def speaks_tls(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the server of an http:// URL completes a TLS handshake: one that speaks TLS closes a plain HTTP request
    without an answer, which reads as a dropped connection. Its certificate is not checked: only the protocol."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        return False
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80, ssl=context), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, asyncio.TimeoutError):
        pass
    return True
