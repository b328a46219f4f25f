"""TLS on the server's own socket: ``DDPM_TLS_CERT_FILE`` and ``DDPM_TLS_KEY_FILE`` (PEM), checked at start, followed
while serving.

Without them the server speaks plain HTTP, as behind a load balancer that ends TLS (the compose file's nginx, a cloud
balancer, an ingress). With them a bearer token and the images cross the network encrypted all the way to the replica
(a cluster whose policy wants TLS between pods, a single host with no proxy in front).

Checked at start: both or neither set, each readable, a PEM certificate (chain) and the key that matches it, and a key
without a pass phrase (OpenSSL would otherwise ask for one on the terminal, and a server under an orchestrator has
none): each is refused naming the variable, before the model loads. A certificate whose validity has ended is said at
start (clients refuse it: "certificate has expired"), not refused: the operator may be replacing it now.

Followed: cert-manager and Kubernetes renew a mounted Secret in place (a new symlink, a new inode), and a replica that
kept the certificate it started with would be refused by every client once that expired. The files are looked at every
``RECHECK_S``; a change is loaded into the live context (new connections get the new certificate, open ones keep
theirs) once the pair loads together: a pair caught between its two writes (a new certificate, the old key) is not
loaded (a warning, once), the certificate in use stays, and the second write's change is loaded.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from service.file_identity import file_identity

log = logging.getLogger("ddpm.server")
RECHECK_S = 2.0  # how long a renewed certificate may wait before new connections get it: two stats per look


def _no_pass_phrase(key_file: Path) -> str:
    raise ValueError(f"DDPM_TLS_KEY_FILE {key_file} is encrypted with a pass phrase: give it a key without one")


def _new_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context holding the pair; ValueError naming the variable that is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # a client offering h2 hears that this server speaks HTTP/1.1
    _load_pair(context, cert_file, key_file)
    return context


def _load_pair(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    for name, path in (("DDPM_TLS_CERT_FILE", cert_file), ("DDPM_TLS_KEY_FILE", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {name} {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=lambda: _no_pass_phrase(key_file))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            why = "the key is not the certificate's (KEY_VALUES_MISMATCH)"
        else:
            why = f"not a PEM certificate and its PEM key ({reason})"
        raise ValueError(f"DDPM_TLS_CERT_FILE {cert_file} and DDPM_TLS_KEY_FILE {key_file}: {why}") from None


def certificate_summary(cert_file: Path) -> tuple[str, datetime | None]:
    """The certificate's subject (its common name) and the end of its validity, where Python's ssl can read them."""
    try:  # the only reader of a certificate's fields in the standard library (CPython's own tests use it)
        fields = ssl._ssl._test_decode_cert(str(cert_file))  # type: ignore[attr-defined]
    except (AttributeError, OSError, ssl.SSLError, ValueError):
        return "", None
    names = [value for rdn in fields.get("subject", ()) for key, value in rdn if key == "commonName"]
    alt = [value for kind, value in fields.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    subject = ", ".join(dict.fromkeys(names + alt))
    try:
        not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(fields["notAfter"]), tz=timezone.utc)
    except (KeyError, ValueError):
        not_after = None
    return subject, not_after


class ServedCertificate:
    """The live server context and the two files it was loaded from."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        """ValueError naming the variable when the pair cannot serve."""
        self.cert_file, self.key_file = cert_file, key_file
        self._identity = self._files()
        self._refused: tuple[object, object] | None = None
        self.context = _new_context(cert_file, key_file)
        self.subject, self.not_after = certificate_summary(cert_file)  # read again with each pair loaded

    def expiry(self) -> float:
        """The end of the served certificate's validity (Unix time; NaN where it cannot be read), at each scrape."""
        return self.not_after.timestamp() if self.not_after is not None else float("nan")

    def describe(self) -> str:
        """One line for the log: what clients are shown, until when; expired said plainly."""
        subject, not_after = self.subject, self.not_after
        line = f"TLS on: certificate {self.cert_file}" + (f" for {subject}" if subject else "")
        if not_after is not None:
            line += f", valid until {not_after:%Y-%m-%d %H:%M} UTC"
            if not_after <= datetime.now(timezone.utc):
                line += ": EXPIRED, clients will refuse it (replace the files: they are followed while serving)"
        return line

    def _files(self) -> tuple[object, object]:
        return file_identity(self.cert_file), file_identity(self.key_file)

    def reload_if_changed(self) -> bool:
        """Load the pair into the live context when either file changed and the two load together; whether it did."""
        identity = self._files()
        if identity in (self._identity, self._refused):  # unchanged, or the pair refused as it is now (said once)
            return False
        try:
            _new_context(self.cert_file, self.key_file)  # the pair checked apart first: a failed load could leave half of it
            _load_pair(self.context, self.cert_file, self.key_file)
        except ValueError as exc:
            self._refused = identity
            log.warning("%s; the certificate loaded before stays in use until the two files load together", exc)
            return False
        self._identity, self._refused = identity, None
        self.subject, self.not_after = certificate_summary(self.cert_file)
        log.info("%s (changed: new connections get it)", self.describe())
        return True

    def follow(self) -> None:
        """Look at the files every RECHECK_S from a daemon thread, for the life of the process."""

        def look() -> None:
            while True:
                time.sleep(RECHECK_S)
                try:
                    self.reload_if_changed()
                except Exception:  # never the end of the following: the next look tries again
                    log.exception("following the TLS files failed")

        threading.Thread(target=look, name="ddpm-tls-files", daemon=True).start()


def served_certificate(cert_file: Path | None, key_file: Path | None) -> ServedCertificate | None:
    """The pair the settings name, or None for plain HTTP; ValueError where one is set without the other."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        given, missing = ("DDPM_TLS_CERT_FILE", "DDPM_TLS_KEY_FILE") if key_file is None else ("DDPM_TLS_KEY_FILE", "DDPM_TLS_CERT_FILE")
        raise ValueError(f"{given} is set without {missing}: TLS needs both (or neither, for plain HTTP)")
    return ServedCertificate(cert_file, key_file)
