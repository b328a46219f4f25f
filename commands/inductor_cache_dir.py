"""``TORCHINDUCTOR_CACHE_DIR`` set to a folder that cannot be made (a volume that is not mounted, a typo): torch makes
it when its compiler is first imported, which building any U-Net does, so ``ddpm sample`` ended in a traceback ending
"FileNotFoundError: [Errno 2] No such file or directory: '/proc/x'" and ``ddpm serve`` said "model failed to load:
FileNotFoundError ..." of a model that was fine (measured). One line naming the variable, before any work."""

from __future__ import annotations

import os


def refuse_an_inductor_cache_that_cannot_be_made(command: str) -> None:
    configured = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not configured:  # torch's default, under the temporary folder: a read-only one leaves the server eager, with a warning
        return
    try:
        os.makedirs(os.path.abspath(configured), exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"ddpm {command}: TORCHINDUCTOR_CACHE_DIR={configured} cannot be made ({exc.strerror or exc}): torch "
                         "keeps its compiled graphs there; point it at a writable folder, or unset it") from None  # fmt: skip
