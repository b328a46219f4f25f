"""The proxy a client's connection goes through, from the environment, as curl and httpx read it (``http_proxy``,
``https_proxy``, ``all_proxy``, lower case first, and ``no_proxy``), decided here so that an error can name it.

Measured (``ddpm generate`` against a server on 127.0.0.1, httpx 0.28): a desktop whose proxy settings export
``all_proxy=socks://127.0.0.1:1080/`` (GNOME's) or ``ALL_PROXY=socks5://...`` ended in a traceback before any request
("Unknown scheme for proxy URL", "the 'socksio' package is not installed"), and ``http_proxy`` naming a proxy that is
down gave "cannot reach http://127.0.0.1:8124" after 15 s of retries while that server answered at once. A loopback
host (localhost, 127.0.0.0/8, ::1) now goes direct whatever the environment says, as Go's HTTP client does: a proxy
on another machine reaching "127.0.0.1" reaches its own. Elsewhere the proxy is used, and named where it fails.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Proxy:
    variable: str  # the environment variable that named it, as set ("all_proxy")
    url: str

    def __str__(self) -> str:
        return f"{self.variable}={self.url}"


def _setting(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for variable in (name, name.upper()):  # lower case first, as curl and urllib read them
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bypassed(host: str, no_proxy: str) -> bool:
    """``no_proxy``'s hosts as curl reads them: ``*`` all, else a name matches itself and its sub-domains (a leading dot
    or not), an address itself, a network (``10.0.0.0/8``, as Docker's documentation writes it) its addresses; a port
    after a name is ignored."""
    host = host.strip("[]").lower()
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        entry = entry.strip("[]").lstrip(".")
        if entry and (host == entry or host.endswith("." + entry) or host == entry.rsplit(":", 1)[0] or _in_network(host, entry)):
            return True
    return False


def _in_network(host: str, entry: str) -> bool:
    if "/" not in entry:
        return False
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:  # a name, not an address; an entry that is no network
        return False


def environment_proxy(url: str, environ: Mapping[str, str] = os.environ) -> Proxy | None:
    """The proxy the environment names for ``url``; None where the connection goes direct."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    no_proxy = _setting(environ, "no_proxy")
    if no_proxy is not None and _bypassed(host, no_proxy[1]):
        return None
    found = _setting(environ, f"{parts.scheme}_proxy") or _setting(environ, "all_proxy")
    if found is None:
        return None
    variable, value = found
    return Proxy(variable, value if "://" in value else f"http://{value}")

