"""What an operator got wrong in the ``DDPM_*`` environment, said in the names they typed.

pydantic names a field (``max_batch``), not the variable (``DDPM_MAX_BATCH``) or the flag (``--max-batch``)
the value came from; and a variable that is no setting (``DDPM_MAX_BACH=256``, a typo) is ignored without a
word, so the server runs on the default the operator believes they changed. Unknown variables are warned
about, not refused: Kubernetes puts ``<SERVICE>_SERVICE_HOST``, ``<SERVICE>_PORT`` and the like into every pod
for each Service in its namespace (a Service named ``ddpm-serve`` gives ``DDPM_SERVE_PORT=tcp://...``), and
those are skipped.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from service.settings import Settings

PREFIX = "DDPM_"
# read by the project, not by Settings: ddpm serve's log level, the client's server, and the test suite's switches
OTHER_VARIABLES = frozenset({"DDPM_LOG_LEVEL", "DDPM_URL", "DDPM_BASE_CACHE", "DDPM_GPU_WHEELS", "DDPM_TEST_DEVICE",
                             "DDPM_FUZZ_EXAMPLES", "DDPM_CHAOS_SECONDS", "DDPM_REPLICAS"})  # fmt: skip
OTHER_PREFIXES = ("DDPM_REQUIRE_",)
# Kubernetes service links (a Service's name upper-cased, "-" as "_"): NAME_SERVICE_HOST, NAME_SERVICE_PORT[_PORTNAME],
# NAME_PORT, NAME_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]
SERVICE_LINK = re.compile(r"[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)")


def variable(field: str) -> str:
    return PREFIX + field.upper()


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def explain(exc: ValidationError) -> str:
    """One line per invalid setting: its variable and flag, what was wrong, and the value given."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        if not field:  # a rule over several settings: its message names them
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        given = f" (got {error['input']!r})" if error.get("input") is not None and not isinstance(error["input"], dict) else ""
        lines.append(f"{variable(field)} / {flag(field)}: {error['msg']}{given}")
    return "\n".join(lines)


def unknown_variables(environ: Mapping[str, str], fields: set[str]) -> list[str]:
    """A warning for each ``DDPM_*`` variable that is no setting (nor one of the project's other variables, nor a
    Kubernetes service link), with the setting it most resembles."""
    known = {variable(field) for field in fields}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in known or name in OTHER_VARIABLES or name.startswith(OTHER_PREFIXES):
            continue
        if SERVICE_LINK.fullmatch(name):
            continue
        close = difflib.get_close_matches(name, sorted(known | {"DDPM_LOG_LEVEL"}), n=1, cutoff=0.75)
        hint = f": did you mean {close[0]}?" if close else " (ddpm serve --help lists them)"
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings


# What a request must fit on an idle server besides its own per-request bound: (what it asks for, the per-request
# setting that bounds it, the setting it must also fit, how that one reads). service.api.generation.never_admitted
# refuses a request over one (422), unreachable_bounds warns of settings that make a per-request bound unreachable,
# and ddpm generate sizes its parts by the images' bounds.
ADMISSION_BOUNDS = (
    ("images", "max_images_per_request", "max_queue", "the queue holds at most"),
    ("images", "max_images_per_request", "max_images_per_client", "a client may have in flight at most"),
    ("U-Net row-calls", "max_calls_per_request", "max_calls_per_client", "a client may have in flight at most"),
)


def unreachable_bounds(settings: Settings) -> list[str]:
    """A warning for each per-request bound that a smaller bound makes unreachable: requests between the two are
    refused (422, ``service.api.generation.never_admitted``), however idle the server."""
    warnings = []
    for _, big, small, _ in ADMISSION_BOUNDS:
        over, under = getattr(settings, big), getattr(settings, small)
        if over > under:
            warnings.append(f"{variable(big)}={over} is over {variable(small)}={under}: requests between the two are refused (422)")
    return warnings

