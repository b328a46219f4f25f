"""``--model org/name[@revision]``: a model published on the Hugging Face Hub, resolved through the
hub's local cache with ``huggingface_hub.snapshot_download`` (so ``HF_HUB_OFFLINE=1``, ``HF_HOME`` and
``HF_HUB_CACHE`` behave as they do for diffusers and transformers).

A value that names an existing directory is that directory; anything else shaped ``org/name`` or
``org/name@revision`` (a branch, tag or commit hash) is a hub repository.
"""

from __future__ import annotations

import re
from pathlib import Path

from ddpm.names import text_name

_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
# what a ddpm-serve or diffusers DDPM repository needs; everything else in a repository (sample
# images, other frameworks' weights) is not downloaded
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.md"]


def hub_reference(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when ``spec`` names a hub repository rather than an existing directory."""
    if Path(spec).expanduser().is_dir():
        return None
    match = _REPO.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        return None
    return match["repo"], match["revision"]


def model_name(spec: str | Path) -> str:
    """How the model is named in answers, metrics and logs: the repository id (with @revision if
    given), else the directory's name (a name that is not UTF-8 with escapes: in an answer it failed every request)."""
    ref = hub_reference(str(spec))
    if ref is not None:
        return ref[0] + (f"@{ref[1]}" if ref[1] else "")
    return text_name(Path(spec).expanduser().resolve().name)


def missing_model(spec: str | Path) -> str | None:
    """Why ``spec`` names no model (neither a directory nor a hub repository), or None: checked without torch, so that
    a command refuses a mistyped path at once rather than after importing it."""
    if hub_reference(str(spec)) is not None or Path(spec).expanduser().is_dir():
        return None
    return f"model directory not found: {spec} (a directory, or a hub repository as org/name[@revision])"


def resolve_model_dir(spec: str | Path) -> Path:
    """The local directory of a model: ``spec`` itself, or the hub cache's snapshot of the
    repository it names (downloaded first unless the hub is offline)."""
    from ddpm.checkpoint import CheckpointError  # torch: not for ``ddpm serve``'s checks before it imports the server

    ref = hub_reference(str(spec))
    if ref is None:
        missing = missing_model(spec)
        if missing is not None:
            raise CheckpointError(missing)
        return Path(spec).expanduser()
    repo_id, revision = ref
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError as exc:
        raise CheckpointError(
            f"{spec} names a Hugging Face Hub repository; loading it needs huggingface_hub (pip install 'ddpm-serve[hub]')"
        ) from exc
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except HFValidationError as exc:
        raise CheckpointError(f"{spec}: not a valid hub repository id: {exc}") from exc
    except Exception as exc:  # offline and not cached, unknown revision, network failures: all say the same to the user
        raise CheckpointError(
            f"cannot resolve hub model {spec} (revision {revision or 'main'}): {type(exc).__name__}: {exc}. "
            "Offline (HF_HUB_OFFLINE=1) it must be in the cache (HF_HOME / HF_HUB_CACHE)."
        ) from exc
