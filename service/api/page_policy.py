"""The web page's Content-Security-Policy (CSP Level 3): the one inline script the page ships runs, by its SHA-256;
anything else injected into the page would not (the page puts server text in with ``textContent`` only, so this is
the second line, not the first). Requests and images come from this origin, images also from the ``data:`` and
``blob:`` URLs the page makes of its own answers and uploads; no plugins, no framing (clickjacking), no ``<base>``,
no form posts elsewhere. Inline ``style`` attributes are allowed: they cannot run code."""

from __future__ import annotations

import base64
import hashlib
import re

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def content_security_policy(html: str) -> str:
    """The policy of ``html``: its inline ``<script>`` blocks allowed by hash, nothing else that runs code."""
    hashes = [base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() for script in _SCRIPT.findall(html)]
    scripts = " ".join(f"'sha256-{h}'" for h in hashes) or "'none'"
    return ("default-src 'none'; "
            f"script-src {scripts}; "
            "style-src 'unsafe-inline'; "
            "img-src 'self' data: blob:; "
            "connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
