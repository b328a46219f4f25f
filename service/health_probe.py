"""The container's health check, ``python -m service.health_probe [PORT]``: exit 0 when this replica's ``/healthz``
answers 200 on its own loopback (port 8000, the image's), else 1 with the reason on stderr.

It speaks https where ``DDPM_TLS_CERT_FILE`` is set (``ddpm serve`` then speaks nothing else: the plain probe the image
had before read a dropped connection, and the container turned "unhealthy" while it served), and tries the other
scheme where the first is closed unanswered (TLS set by a flag, not the variable). Over https only the protocol is
checked, not the certificate, which names the service's host and not 127.0.0.1 (kubelet's HTTPS probes do the same).
It goes past any proxy the environment names: a Docker client's configured proxies reach every container as
``HTTP_PROXY``, and one elsewhere cannot reach this container's 127.0.0.1. Standard library only: no torch, in 50 ms.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 2.0  # the image's HEALTHCHECK gives the whole check 3 s


def _status(url: str) -> int:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    with opener.open(url, timeout=TIMEOUT_S) as answer:
        return int(answer.status)


def healthy(port: int = 8000, tls: bool | None = None) -> tuple[bool, str]:
    """Whether /healthz answers 200, and what was heard; ``tls`` None: as DDPM_TLS_CERT_FILE says."""
    if tls is None:
        tls = bool(os.environ.get("DDPM_TLS_CERT_FILE", "").strip())
    schemes = ("https", "http") if tls else ("http", "https")
    heard = ""
    for scheme in schemes:
        url = f"{scheme}://127.0.0.1:{port}/healthz"
        try:
            status = _status(url)
        except urllib.error.HTTPError as exc:  # answered: 503 (stalled, draining) is an answer, not another scheme's case
            return False, f"{url}: {exc.code}"
        except (OSError, http.client.HTTPException) as exc:
            heard = f"{url}: {getattr(exc, 'reason', None) or exc}"
            if isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                return False, heard  # nothing listens: the other scheme would not either
            continue  # closed unanswered or a failed handshake: the server may speak the other scheme
        return status == 200, f"{url}: {status}"
    return False, heard


def main(argv: list[str]) -> int:
    port = int(argv[0]) if argv else 8000
    ok, heard = healthy(port)
    if not ok:
        print(f"health probe: {heard}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
