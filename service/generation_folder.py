"""A folder of one PNG per image of a seed (``ddpm generate -n 50000 -o samples/``): asked for in parts, several at
once, each part's images written as it arrives; the same command again asks only for the images not there yet.

A data set (FID's 50,000 samples) takes hours. One ``.npy`` or grid at the end lost all of it to a Ctrl-C, a dropped
connection or a reboot; a folder loses at most the parts in flight. Image k of a seed is a pure function of the model's
fingerprint, the precision and the chain (README "Reproducibility contract"), so a folder is those, and any k's: its
``ddpm-generate.json`` records them from the first answer, and every answer is checked against it before its images are
written. A replica behind a balancer that serves another model or precision (a rolling update, a mixed fleet) is
refused, never mixed in; a resume sends the folder's chain, whatever the server's defaults have become meanwhile. The
device type is not checked: a GPU's images differ from a CPU's by float rounding only (at most one PNG level).

Files are ``NNNNNN.png`` (k, six digits or more), each written whole or not at all (``ddpm.atomic_file``): a file
that is there is a whole image of this folder's chain. Two commands may fill one folder at once (other ranges, or the
same: the same bytes); the record is created once, without overwriting (``os.link``).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.client_results import BadAnswer, ClientError, EventHandler, Generation, ServerError

if TYPE_CHECKING:
    import httpx


class Server(Protocol):
    """What ``fill`` asks through: ``service.client.AsyncClient``."""

    async def info(self, http: httpx.AsyncClient | None = None) -> dict[str, Any]: ...

    async def generate(self, seed: int = 0, n: int = 1, *, on_event: EventHandler | None = None,
                       http: httpx.AsyncClient | None = None, **chain: Any) -> Generation: ...  # fmt: skip


RECORD_NAME = "ddpm-generate.json"
# beyond (seed, k), what image k depends on, as every answer says it (service.api.schemas.ChainAnswer)
IDENTITY = ("seed", "fingerprint", "precision", "sampler", "steps", "eta", "timestep_spacing", "clip_denoised",
            "guidance_scale", "strength", "jump_length", "jump_n_sample", "input_sha256")  # fmt: skip
FLAGS = {"seed": "--seed", "sampler": "--sampler", "steps": "--steps", "eta": "--eta", "timestep_spacing": "--spacing",
         "clip_denoised": "--clip", "guidance_scale": "--guidance-scale", "strength": "--strength",
         "jump_length": "--jump-length", "jump_n_sample": "--jump-n-sample", "class_label": "--class-label",
         "input_sha256": "--init-image / --mask"}  # fmt: skip


class FolderRefused(ClientError):
    """The folder cannot take these images: another chain's, another model's, or not a folder of this command."""


def image_name(k: int) -> str:
    return f"{k:06d}.png"


def parts_of(missing: list[int], size: int) -> list[tuple[int, int]]:
    """(first k, count) of each request: the missing k's in runs of consecutive ones, each run cut into ``size``."""
    parts: list[tuple[int, int]] = []
    for k in missing:
        if parts and parts[-1][0] + parts[-1][1] == k and parts[-1][1] < size:
            parts[-1] = (parts[-1][0], parts[-1][1] + 1)
        else:
            parts.append((k, 1))
    return parts


def _shown(value: object) -> str:
    return json.dumps(value) if isinstance(value, str | None | bool) else str(value)


@dataclass
class GenerationFolder:
    path: Path
    record: dict[str, Any] | None = None  # the folder's ddpm-generate.json: None until the first answer is written

    @classmethod
    def open(cls, path: str | Path) -> GenerationFolder:
        """The folder (made if missing), its record read; one that holds other files and no record is refused (its
        ``000012.png`` would be taken for image 12)."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):  # a folder that cannot be written is said now, not after the first part
                pass
            record_text = (path / RECORD_NAME).read_text(encoding="utf-8") if (path / RECORD_NAME).exists() else None
            others = [e.name for e in os.scandir(path) if not e.name.startswith(".")]
        except OSError as exc:
            raise FolderRefused(f"{path}: {exc}") from exc
        if record_text is None:
            if others:
                named = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
                raise FolderRefused(f"{path} holds {len(others)} file{'s' * (len(others) > 1)} ({named}) and no {RECORD_NAME}: "
                                    "not a folder of ddpm generate; name a new or empty folder")  # fmt: skip
            return cls(path)
        try:
            record = json.loads(record_text)
        except ValueError as exc:
            raise FolderRefused(f"{path / RECORD_NAME}: not JSON ({exc})") from exc
        if not isinstance(record, dict) or any(k not in record for k in IDENTITY):
            raise FolderRefused(f"{path / RECORD_NAME}: not a record of ddpm generate (it names no {', '.join(IDENTITY)})")
        return cls(path, record)

    def missing(self, first: int, n: int) -> list[int]:
        """The k's of first..first+n-1 whose file is not there."""
        there = {e.name for e in os.scandir(self.path)}
        return [k for k in range(first, first + n) if image_name(k) not in there]

    def request_chain(self, seed: int, chain: dict[str, Any]) -> dict[str, Any]:
        """``chain`` with the folder's value for every field it leaves out; FolderRefused naming each flag that differs."""
        if isinstance(chain.get("class_label"), list):  # one per image of a request: not what a folder of any k's holds
            raise FolderRefused("a folder takes one class label or 'balanced' (image k: class k mod the classes), not a list")
        if self.record is None:
            return chain
        asked = {"seed": seed, **chain}
        differ = [f"{FLAGS[k]}: the folder's images have {_shown(self.record.get(k))}, this command asks for {_shown(v)}"
                  for k, v in asked.items() if k in FLAGS and v is not None and v != self.record.get(k)]  # fmt: skip
        if self.record.get("input_sha256") and not (chain.get("image") or chain.get("mask")):
            differ.append(f"{FLAGS['input_sha256']}: the folder's images are edits of an input (input_sha256 "
                          f"{self.record['input_sha256'][:12]}...), this command gives none")  # fmt: skip
        if differ:
            raise FolderRefused(f"{self.path} holds another chain's images: " + "; ".join(differ) + ": name another folder")
        return {**chain, **{k: self.record[k] for k in self._resolved() if chain.get(k) is None}}

    def _resolved(self) -> list[str]:
        """The record's fields a resume sends where the command names none: the server's defaults may have changed
        since (a field that means nothing for this chain, an unconditional model's guidance, stays unsent)."""
        assert self.record is not None
        names = ["sampler", "steps", "timestep_spacing", "clip_denoised"] + ["eta"] * bool(self.record.get("eta"))
        if self.record.get("class_label") is not None:
            names += ["class_label", "guidance_scale"]
        if self.record.get("input_sha256"):
            names += [k for k in ("strength", "jump_length", "jump_n_sample") if self.record.get(k) is not None]
        return names

    def check_server(self, info: dict[str, Any]) -> None:
        """FolderRefused before any work where the server serves another model or precision than the folder's."""
        model = info.get("model") if isinstance(info.get("model"), dict) else {}
        self.check_model(model.get("fingerprint"), info.get("precision"), f"the server serves model {_shown(model.get('name'))}")

    def check_model(self, fingerprint: object, precision: object, whose: str) -> None:
        """FolderRefused where the folder's images came from another model (fingerprint) or precision than ``whose``."""
        if self.record is not None:
            self._same({"fingerprint": fingerprint, "precision": precision}, whose)

    def accept(self, part: Generation, first: int, count: int, class_label: object = None) -> None:
        """The part's images written, once its answer is checked against the folder's record (made from it and the
        request's ``class_label`` if none) and found to hold images first..first+count-1."""
        if len(part.pngs) != count or part.meta.get("first_image", first) != first:
            raise BadAnswer(f"asked for images {first}..{first + count - 1}, the answer holds {len(part.pngs)} from "
                            f"{part.meta.get('first_image')}")  # fmt: skip
        for i, png in enumerate(part.pngs):  # a file that is there is never asked for again: it must be a whole image
            if (problem := _not_a_png(png)) is not None:
                raise BadAnswer(f"image {first + i} of the answer is not a whole PNG ({problem}): nothing of the answer written")
        if self.record is None:
            self.record = self._created(part, class_label)
        self._same({k: part.meta.get(k) for k in IDENTITY}, f"an answer for images {first}.. came from model "
                                                             f"{_shown(part.meta.get('model'))}")  # fmt: skip
        from ddpm.atomic_file import atomic_write

        for i, png in enumerate(part.pngs):
            atomic_write(self.path / image_name(first + i), lambda tmp, png=png: Path(tmp).write_bytes(png))  # type: ignore[misc]

    def _same(self, facts: dict[str, Any], whose: str) -> None:
        assert self.record is not None
        differ = [f"{k} {_shown(self.record.get(k))} there, {_shown(v)} here" for k, v in facts.items() if v != self.record.get(k)]
        if differ:
            raise FolderRefused(f"{self.path} holds the images of model {_shown(self.record.get('model'))}; {whose}: "
                                + "; ".join(differ) + " (a fleet that must give the same images pins DDPM_PRECISION and "
                                "serves one model): nothing of it written")  # fmt: skip

    def _created(self, part: Generation, class_label: object) -> dict[str, Any]:
        """The record of the first answer, created without overwriting one another command created meanwhile (read then)."""
        record = {**{k: part.meta.get(k) for k in IDENTITY}, "model": part.meta.get("model"), "class_label": class_label}
        target = self.path / RECORD_NAME
        text = json.dumps(record, indent=1) + "\n"
        tmp = self.path / f".{RECORD_NAME}.{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, target)  # whole, and only where none is there
        except FileExistsError:
            return GenerationFolder.open(self.path).record or record
        except OSError:  # no hard links here (FAT, some network file systems): created exclusively, then written
            try:
                with open(target, "x", encoding="utf-8") as created:
                    created.write(text)
            except FileExistsError:
                return GenerationFolder.open(self.path).record or record
        finally:
            tmp.unlink(missing_ok=True)
        return record


def _not_a_png(data: bytes) -> str | None:
    """Why ``data`` is not a whole PNG (Pillow reads its every chunk and checks their CRCs), or None."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.verify()
    except Exception as exc:  # Pillow's errors are of many classes (SyntaxError, OSError, UnidentifiedImageError)
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class FolderResult:
    folder: Path
    asked: int  # images first..first+n-1
    already_there: int
    written: int = 0
    requests: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # the chain, as the folder's record has it


class _Progress:
    """The parts' stream events as one: ``progress`` summed over the parts (finished ones counted whole), out of
    every image still to make; ``written`` after each part."""

    def __init__(self, on_event: EventHandler | None, to_make: int, result: FolderResult) -> None:
        self.on_event, self.to_make, self.result = on_event, to_make, result
        self.done: dict[int, float] = {}
        self.per_image: float | None = None

    def of_part(self, first: int, count: int) -> EventHandler | None:
        if self.on_event is None:
            return None

        def hear(name: str, data: dict[str, Any]) -> None:
            if name == "progress" and isinstance(data.get("total"), int | float) and isinstance(data.get("steps_done"), int | float):
                self.per_image = data["total"] / count
                self.done[first] = data["steps_done"]
                self._say()
            elif name != "progress":
                self.on_event(name, data)  # type: ignore[misc]

        return hear

    def part_written(self, first: int, count: int) -> None:
        if self.per_image is not None:
            self.done[first] = self.per_image * count
        if self.on_event is not None:
            self._say()
            self.on_event("written", {"images": self.result.already_there + self.result.written, "of": self.result.asked})

    def _say(self) -> None:
        if self.per_image is not None and self.on_event is not None:
            self.on_event("progress", {"steps_done": round(sum(self.done.values())), "total": round(self.per_image * self.to_make)})


async def fill(client: Server, folder: GenerationFolder, seed: int, n: int, *, first: int = 0, parallel: int = 1,
               per_request: int | None = None, on_event: EventHandler | None = None, http: httpx.AsyncClient | None = None,
               info: dict[str, Any] | None = None, **chain: Any) -> FolderResult:  # fmt: skip
    """Images first..first+n-1 of ``seed`` that ``folder`` lacks, asked for in parts of at most ``per_request`` images,
    ``parallel`` at a time; each part's images written when it arrives. ``info``: the server's GET /info where the
    caller has it (asked for otherwise, where the folder has images: another model or precision is refused before any
    work). ``on_event``: the parts' ``queued`` events, their ``progress`` as one, ``written`` after each part."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    chain = folder.request_chain(seed, chain)
    if folder.record is not None:
        folder.check_server(info if info is not None else await client.info(http))
    missing = folder.missing(first, n)
    result = FolderResult(folder.path, n, n - len(missing))
    queue = parts_of(missing, per_request or n)
    progress = _Progress(on_event, len(missing), result)
    label = chain.get("class_label")

    async def worker() -> None:
        while queue:
            start, count = queue.pop(0)
            hear = progress.of_part(start, count)
            try:
                part = await client.generate(seed, count, first_image=start, on_event=hear, http=http, **chain)
            except ServerError as exc:
                fit = exc.images_within_cost()
                if fit is None or fit >= count:
                    raise
                # the chain costs more U-Net calls a request than the server allows: every part left cut to what fits
                queue[:] = parts_of(sorted(k for s, c in [(start, count), *queue] for k in range(s, s + c)), fit)
                continue
            folder.accept(part, start, count, label)
            result.written, result.requests = result.written + count, result.requests + 1
            progress.part_written(start, count)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(parallel, len(queue)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:  # the first failure (or a Ctrl-C) ends the others: their parts are asked for again next time
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    result.meta = {k: v for k, v in (folder.record or {}).items()}
    return result
