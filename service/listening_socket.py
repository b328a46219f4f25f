"""The server's listening socket for ``--host ::``: both IPv6 and IPv4 on one socket (dual stack), as Go's and Java's
servers listen on the any address.

Measured (uvicorn 0.54, Linux): ``ddpm serve --host ::`` answered http://[::1]:PORT and refused http://127.0.0.1:PORT,
since asyncio sets IPV6_V6ONLY on every IPv6 socket it makes. The image and the Kubernetes Deployment listened on
``0.0.0.0``, IPv4 only: in an IPv6-only cluster (EKS's IPv6 mode, a single-stack IPv6 kind cluster) the kubelet's
probes to the pod's IPv6 address were refused and no replica was ever ready. They listen on ``::`` now, which keeps
every IPv4 client; a kernel without IPv6 (``ipv6.disable=1``) gets ``0.0.0.0`` and a warning.
"""

from __future__ import annotations

import errno
import logging
import socket

log = logging.getLogger("ddpm.server")

ANY_IPV6 = ("::", "[::]")
BACKLOG = 2048  # uvicorn's default, which it passes to listen() on a socket it is given


def listening_socket(host: str, port: int) -> tuple[socket.socket | None, str]:
    """(a bound dual-stack socket for uvicorn, the host) for the IPv6 any address; (None, host) for any other host,
    which uvicorn binds itself as before; (None, "0.0.0.0") where the kernel has no IPv6. Raises OSError where the
    port cannot be bound (in use, privileged)."""
    if host not in ANY_IPV6:
        return None, host
    if not socket.has_dualstack_ipv6():
        log.warning("--host %s: this kernel has no IPv6 (or no dual stack); listening on 0.0.0.0, IPv4 only", host)
        return None, "0.0.0.0"
    try:
        sock = socket.create_server(("::", port), family=socket.AF_INET6, backlog=BACKLOG, dualstack_ipv6=True)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        log.warning("--host %s: cannot listen on IPv6 (%s); listening on 0.0.0.0, IPv4 only", host, exc.strerror)
        return None, "0.0.0.0"
    log.info("listening on [::]:%d, IPv6 and IPv4", port)  # uvicorn says nothing of a socket it is given
    return sock, "::"
