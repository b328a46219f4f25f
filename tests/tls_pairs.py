"""Certificates and keys for the TLS tests, made by the ``openssl`` command (Debian's; required where .ci/run sets
DDPM_REQUIRE_SYSTEM_TOOLS, else the tests skip): self-signed, for localhost and 127.0.0.1 unless told."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def openssl_or_skip() -> str:
    found = shutil.which("openssl")
    if found is None:
        if os.environ.get("DDPM_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail("openssl is required in CI but not installed", pytrace=False)
        pytest.skip("openssl is not installed (apt-get install openssl)")
    return found


def tls_pair(directory: Path, name: str, days: int = 30, hosts: str = "DNS:localhost,IP:127.0.0.1") -> tuple[Path, Path]:
    """``name``.crt and ``name``.key in ``directory``: valid from now for ``days`` (negative: ended that many days ago)."""
    openssl = openssl_or_skip()
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, request = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    subject = ["-subj", f"/CN={name}", "-addext", f"subjectAltName={hosts}"]
    subprocess.run([openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, *subject],
                   check=True, capture_output=True)  # fmt: skip
    # x509 -req takes a negative -days (an expired certificate: not before now, not after yesterday); req -x509 does not
    subprocess.run([openssl, "x509", "-req", "-in", request, "-signkey", key, "-out", cert, "-days", str(days),
                    "-copy_extensions", "copy"], check=True, capture_output=True)  # fmt: skip
    return cert, key
