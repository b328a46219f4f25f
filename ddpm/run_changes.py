"""What a resumed ``ddpm train`` or ``ddpm distill`` command changes of the run it resumes.

A run directory resumes exactly (weights, optimiser, RNG states); its model card records one configuration for
the whole run. So a resume may change only what does not shape the result (how far it goes, how often it saves,
its threads), and anything else is refused, each difference named as the flag the user typed."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def changed_flags(saved: Mapping[str, Any], now: Mapping[str, Any], resumable: Collection[str],
                  flags: Mapping[str, str] | None = None) -> list[str]:  # fmt: skip
    """``--flag saved (this command: new)`` for each field of ``now`` outside ``resumable`` that differs from
    ``saved``; ``flags`` names a field whose flag is not its own name."""
    flags = flags or {}
    names = [k for k in now if k not in resumable and _text(saved.get(k)) != _text(now[k])]
    return [f"{flags.get(k, '--' + k.replace('_', '-'))} {_text(saved.get(k))} (this command: {_text(now[k])})" for k in names]


def refusal(state_path: object, verb: str, changes: list[str]) -> str:
    return f"{state_path} was {verb} with {', '.join(changes)}: resume it with the same flags, or give a new --run-dir for another run"


def _text(v: object) -> object:
    return ",".join(str(x) for x in v) if isinstance(v, list | tuple) else v


def data_facts(images: int, sha256: str) -> dict[str, Any]:
    """What a run records of its --data (``ddpm.data.Dataset``): how many images, and the hash of the source as stored."""
    return {"images": images, "sha256": sha256}


def refuse_other_data(state_path: object, verb: str, data: str, saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """ValueError where a run would resume on other data than it began on. A folder given as --data is the same flag with
    other images after files were added or changed: the run went on silently (a resume is exact only on the same images,
    and the card names the folder as if it held them). A run saved before its data was recorded resumes as it did."""
    if saved is None or dict(saved) == dict(now):
        return
    raise ValueError(f"{state_path} was {verb} on {saved['images']} images of --data {data} (sha256 {str(saved['sha256'])[:12]}); it "
                     f"holds {now['images']} now (sha256 {str(now['sha256'])[:12]}): resume it on the same images, or give a new "
                     "--run-dir for another run")  # fmt: skip
