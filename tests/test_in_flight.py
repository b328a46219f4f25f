"""Identical requests in flight share one engine job (service/api/in_flight.py): one request's U-Net work for
all of them, the same images, X-Cache ``shared`` (a more urgent request raising the job's priority); not where
sharing would serve a request worse (a tighter deadline), not with the response cache off; the job runs on while
any of them waits, and every stream sharing it sees its progress."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from service.api.in_flight import InFlightRequests, serves_as_well
from service.api.job_handle import JobHandle
from service.engine.job import Job
from service.response_cache import ImageKey
from service.server_state import ServerState
from tests.app_client import app_and_state, metric, wait_ready
from tests.batch_rounding import png_levels
from tests.tiny_model import save_tiny_model

REQUEST = {"seed": 7, "batch_size": 2, "steps": 6, "sampler": "ddim"}
OPENAI = {"prompt": "x", "n": 2, "seed": 7, "steps": 6, "sampler": "ddim"}  # the same images in OpenAI's dialect


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=30)


class GatedUNet:
    """Wraps the engine's U-Net: counts the rows it is called on, and holds its ``hold_at``-th call (and any after it)
    until released."""

    def __init__(self, state: ServerState, hold_at: int = 1) -> None:
        assert state.engine is not None
        self.real, self.rows, self.entered, self.release = state.engine.model.eps_model, 0, threading.Event(), threading.Event()
        self.calls, self.hold_at = 0, hold_at
        state.engine.model.eps_model = self

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls >= self.hold_at:
            self.entered.set()
            self.release.wait(30)
        time.sleep(0.03)  # paced, so that a stream sees progress before the answer
        self.rows += x.shape[0]
        return self.real(x, *args, **kwargs)


def _concurrently(unet: GatedUNet, first: Callable[[], Any], others: list[Callable[[], Any]], joined: Callable[[], bool]) -> list:
    """``first`` runs until its job holds the U-Net, then ``others`` start; released once ``joined()``."""
    results: list[Any] = [None] * (1 + len(others))

    def run(i: int, call: Callable[[], Any]) -> None:
        results[i] = call()

    threads = [threading.Thread(target=run, args=(0, first))]
    threads[0].start()
    assert unet.entered.wait(30)
    threads += [threading.Thread(target=run, args=(i + 1, call)) for i, call in enumerate(others)]
    for t in threads[1:]:
        t.start()
    end = time.monotonic() + 30
    while not joined():
        assert time.monotonic() < end, "the other requests did not reach the server"
        time.sleep(0.01)
    unet.release.set()
    for t in threads:
        t.join(60)
    return results


def _stream(c: TestClient, body: dict, path: str = "/generate/stream") -> list[tuple[str, dict]]:
    with c.stream("POST", path, json=body) as s:
        text = s.read().decode()
    blocks = [b for b in text.split("\n\n") if b.startswith("event:")]
    return [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("data: ", 1)[1])) for b in blocks]


def test_identical_requests_in_flight_share_one_job(model_dir: Path) -> None:
    c, state = app_and_state(model_dir, compile="off")
    with c:
        wait_ready(c)
        unet = GatedUNet(state)
        shared = 'ddpm_response_cache_lookups_total{result="shared"}'
        sent: dict[str, float] = {}

        def timed_twin() -> Any:  # sent 0.2 s into the job: a total counted from the job's start would exceed its own time
            time.sleep(0.2)
            sent["at"] = time.monotonic()
            answer = c.post("/generate", json=REQUEST)
            sent["seconds"] = time.monotonic() - sent["at"]
            return answer

        first, json_twin, png_twin, openai_twin, stream_twin = _concurrently(
            unet,
            lambda: c.post("/generate", json=REQUEST),
            [
                timed_twin,
                lambda: c.post("/generate", json=REQUEST, headers={"Accept": "image/png"}),
                lambda: c.post("/v1/images/generations", json=OPENAI),
                lambda: _stream(c, REQUEST),
            ],
            lambda: metric(c, shared) == 4,
        )
        assert unet.rows == 2 * 6  # one request's images x steps: the other four made nothing
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        for twin in (json_twin, png_twin, openai_twin):
            assert twin.status_code == 200 and twin.headers["x-cache"] == "shared", twin.text[:200]
        assert json_twin.json()["images"] == first.json()["images"] and json_twin.json()["cached"] is False
        assert [d["b64_json"] for d in openai_twin.json()["data"]] == first.json()["images"]
        assert base64.b64decode(first.json()["images"][0])[:8] == png_twin.content[:8] == b"\x89PNG\r\n\x1a\n"
        events = dict(stream_twin)
        assert events["result"]["images"] == first.json()["images"] and "progress" in events, stream_twin
        # the twins arrived after the job started: no queue wait of theirs, and their totals are their own (within the
        # twin's own time as its client saw it; against the first's total it failed once by 2 ms beside the suite: the
        # answers are made one after another at the job's end)
        timings = json_twin.json()["timings"]
        assert timings["queue_wait_s"] == 0 and timings["total_s"] <= sent["seconds"]
        assert metric(c, 'ddpm_response_cache_lookups_total{result="miss"}') == 1
        assert len(state.in_flight) == 0  # forgotten once done: the next identical request is a cache hit
        assert c.post("/generate", json=REQUEST).headers["x-cache"] == "hit"


def test_a_request_for_part_of_a_running_job_shares_it(model_dir: Path) -> None:
    """Images 1..2 of a seed while a job makes 0..3 (every image of it in the running batch): no U-Net work of its own,
    those images' bytes; a part that reaches past the job, or another seed, gets a job of its own."""
    c, state = app_and_state(model_dir, compile="off")
    with c:
        wait_ready(c)
        unet = GatedUNet(state)
        others = [
            lambda: c.post("/generate", json={**REQUEST, "first_image": 1}),
            lambda: c.post("/generate", json={**REQUEST, "first_image": 3}),  # images 3..4 of a job making 0..3
            lambda: _stream(c, {**REQUEST, "batch_size": 1}),
        ]
        whole, part, past, streamed = _concurrently(
            unet,
            lambda: c.post("/generate", json={**REQUEST, "batch_size": 4}),
            others,
            lambda: metric(c, 'ddpm_response_cache_lookups_total{result="shared"}') == 2
            and metric(c, 'ddpm_response_cache_lookups_total{result="miss"}') == 2,
        )
        assert part.status_code == 200 and part.headers["x-cache"] == "shared" and part.json()["first_image"] == 1
        assert part.json()["images"] == whole.json()["images"][1:3]
        assert past.headers["x-cache"] == "miss"
        # its own job: the same image up to the U-Net's batched rounding (README "Reproducibility contract")
        assert np.abs(png_levels(past.json()["images"][0]) - png_levels(whole.json()["images"][3])).max() <= 1
        # a stream for image 0 alone counts its own image's steps (6), not the whole job's (4 x 6)
        progress = [data for event, data in streamed if event == "progress"]
        assert progress and all(p["total"] == 6 and p["steps_done"] <= 6 for p in progress), progress
        assert dict(streamed)["result"]["images"] == whole.json()["images"][:1]
        assert unet.rows == (4 + 2) * 6  # the whole job's and the one past it: the part made nothing
        assert len(state.in_flight) == 0


def _previews(events: list[tuple[str, dict]], name: str = "preview", index: str = "preview_index", image: str = "image") -> dict:
    """{(image index, preview index): the preview's 8-bit levels} of a stream's events."""
    return {(data["image_index"], data[index]): png_levels(data[image]) for event, data in events if event == name}


def test_streams_sharing_a_job_get_its_previews_from_each_images_newest(model_dir: Path) -> None:
    """A stream that shares a job (a retry of a stream, an identical one, one for part of its images) got no preview
    events: the job's were its creator's only. Now each gets the job's previews of its own images where it asked for as
    many, from each image's newest when it joined (here the first of each, made before they came); one that asked for
    another count gets none (a job makes its previews at its own fractions of the calls), and shares the job all the
    same."""
    c, state = app_and_state(model_dir, compile="off")
    with c:
        wait_ready(c)
        unet = GatedUNet(state, hold_at=4)  # 6 calls, 2 previews: after calls 2 and 4; the others join after the first
        asked = {**REQUEST, "previews": 2}
        first, twin, part, other_count, openai = _concurrently(
            unet,
            lambda: _stream(c, asked),
            [
                lambda: _stream(c, asked),
                lambda: _stream(c, {**asked, "first_image": 1, "batch_size": 1}),
                lambda: _stream(c, {**asked, "previews": 1}),
                lambda: _stream(c, {**OPENAI, "stream": True, "partial_images": 2}, "/v1/images/generations"),
            ],
            lambda: metric(c, 'ddpm_response_cache_lookups_total{result="shared"}') == 4,
        )
        assert unet.rows == 2 * 6  # one job for all five
        made = _previews(first)
        assert sorted(made) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for shared, ours in ((twin, made), (part, {(0, i): made[1, i] for i in range(2)})):
            theirs = _previews(shared)
            assert sorted(theirs) == sorted(ours), shared
            assert all(np.array_equal(theirs[k], ours[k]) for k in ours)
        assert _previews(other_count) == {} and dict(other_count)["result"]["images"] == dict(first)["result"]["images"]
        partial = _previews(openai, "image_generation.partial_image", "partial_image_index", "b64_json")
        assert sorted(partial) == sorted(made) and all(np.array_equal(partial[k], made[k]) for k in made)


def test_no_sharing_with_the_response_cache_off(model_dir: Path) -> None:
    c, state = app_and_state(model_dir, compile="off", response_cache_mb=0)
    with c:
        wait_ready(c)
        unet = GatedUNet(state)
        iterations = metric(c, "ddpm_iterations_total")
        answers = _concurrently(
            unet, lambda: c.post("/generate", json=REQUEST), [lambda: c.post("/generate", json=REQUEST)], lambda: True
        )
        assert [a.headers["x-cache"] for a in answers] == ["miss", "miss"] and unet.rows > 2 * 6
        assert metric(c, "ddpm_iterations_total") > iterations


def test_a_more_urgent_request_shares_the_job_and_raises_its_priority(model_dir: Path) -> None:
    """A priority-0 request identical to a priority-5 job in flight computed the same images again beside it (a job of
    its own: twice the U-Net work); now it shares the job, which runs at priority 0 from then on (``Engine.promote``).
    A request with a deadline still gets a job of its own beside a job without one."""
    c, state = app_and_state(model_dir, compile="off")
    with c:
        wait_ready(c)
        unet = GatedUNet(state)
        bulk = {**REQUEST, "priority": 5}
        answers = _concurrently(
            unet,
            lambda: c.post("/generate", json=bulk),
            [lambda: c.post("/generate", json=REQUEST), lambda: c.post("/generate", json={**bulk, "deadline_s": 60})],
            lambda: metric(c, 'ddpm_response_cache_lookups_total{result="miss"}') == 2
            and metric(c, 'ddpm_response_cache_lookups_total{result="shared"}') == 1,
        )
        assert [a.status_code for a in answers] == [200] * 3 and [a.headers["x-cache"] for a in answers] == ["miss", "shared", "miss"]
        assert answers[0].json()["images"] == answers[1].json()["images"] == answers[2].json()["images"]
        assert answers[1].json()["priority"] == 0 and answers[0].json()["priority"] == 5  # each request's own, echoed
        assert unet.rows == 2 * 2 * 6  # two jobs' work, not three


def _promoted(job: Job) -> bool:
    """``Engine.promote`` where the engine takes every promotion (none of these jobs is done)."""
    return True


def _job(priority: int = 0, deadline_s: float | None = None, created: float = 100.0) -> Job:
    return Job(ImageRequest(0, 1, ChainSpec(steps=5, clip=True)), timeout_s=60, priority=priority, deadline_s=deadline_s, created=created)


def test_who_may_share_a_job() -> None:
    job = _job(priority=1, deadline_s=10.0, created=100.0)  # wanted by 110
    assert serves_as_well(job, None, 105.0)  # no deadline (at any priority: a more urgent one promotes the job)
    assert serves_as_well(job, 5.0, 105.0)  # wanted by 110 too
    assert not serves_as_well(job, 4.0, 105.0)  # wanted by 109
    assert not serves_as_well(_job(deadline_s=None), 60.0, 100.0)  # a job without a deadline is not hurried
    job.cancel()
    assert not serves_as_well(job, None, 105.0)  # a cancelled job ends as soon as it can


def test_a_part_shares_a_job_only_once_every_image_of_it_runs() -> None:
    """A job with images still queued may end later than a part's own job would (its rows wait for room): a part shares
    it only once it runs whole; an identical request shares it at once."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        spec = ChainSpec(steps=5, clip=True)
        job = Job(ImageRequest(0, 8, spec), timeout_s=60, created=100.0)
        job.pending.extend(range(8))
        in_flight = InFlightRequests()
        in_flight.add(ImageKey("m", "fp32", "cpu", job.request), JobHandle(job, loop))
        part = ImageKey("m", "fp32", "cpu", ImageRequest(0, 2, spec, first=3))
        assert in_flight.join(part, None, 100.0, stream=False, promote=_promoted) is None  # queued
        assert in_flight.join(ImageKey("m", "fp32", "cpu", job.request), None, 100.0, stream=False, promote=_promoted) is not None
        job.first_admitted = 101.0
        for _ in range(6):
            job.pending.popleft()
        assert in_flight.join(part, None, 102.0, stream=False, promote=_promoted) is None  # two images still wait for room
        job.pending.clear()
        assert in_flight.join(part, None, 102.0, stream=False, promote=_promoted) is not None  # running whole
        for other in (ImageRequest(0, 2, spec, first=7), ImageRequest(1, 2, spec, first=3), ImageRequest(0, 2, spec, (1, 1), first=3)):
            assert in_flight.join(ImageKey("m", "fp32", "cpu", other), None, 102.0, stream=False, promote=_promoted) is None, other

    asyncio.run(scenario())


def test_the_job_runs_on_while_anyone_waits_and_every_stream_sees_its_progress() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        job = _job(created=time.monotonic())
        key = ImageKey("m", "fp32", "cpu", job.request)
        in_flight = InFlightRequests()
        handle = JobHandle(job, loop)
        in_flight.add(key, handle)
        twin = in_flight.join(key, None, 100.0, stream=True, promote=_promoted)
        assert twin is handle and handle.waiters == 2 and job.on_progress is not None  # a stream asks for progress

        async def gone() -> bool:
            return True

        assert await handle.wait(gone, poll_s=0.01) is None and not job.cancelled  # one left; one still waits
        seen: list[list[int]] = [[], []]

        async def read(i: int) -> None:
            async for event in handle.events(min_interval_s=0):
                if event is not None:
                    seen[i].append(event.steps_done)

        readers = [asyncio.ensure_future(read(i)) for i in range(2)]
        for step in (1, 2, 3):
            await asyncio.sleep(0.01)
            job.steps_done = step
            threading.Thread(target=job.on_progress, args=(job,)).start()  # the engine's thread
            await asyncio.sleep(0.02)
        job.finished = time.monotonic()
        job.on_done(job)  # type: ignore[misc]
        await asyncio.gather(*readers)
        assert seen == [[1, 2, 3], [1, 2, 3]]  # both readers, every event: neither took the other's
        assert len(in_flight) == 0 and in_flight.join(key, None, 100.0, stream=False, promote=_promoted) is None
        # the last waiter leaving cancels the job: at once without a grace
        other = JobHandle(_job(created=time.monotonic()), loop)
        other.leave()
        assert other.job.cancelled
        # with a grace (DDPM_RETRY_GRACE_S), a retry that shares it meanwhile keeps it, and a later leave starts a new grace
        graced = JobHandle(_job(created=time.monotonic()), loop)
        graced.grace_s = 0.2
        graced.leave()  # t = 0: the first grace would end at 0.2
        await asyncio.sleep(0.05)
        assert not graced.job.cancelled and graced.share(stream=False) is graced
        await asyncio.sleep(0.05)
        graced.leave()  # t = 0.1: a new grace, to 0.3
        await asyncio.sleep(0.15)
        assert not graced.job.cancelled  # t = 0.25: past the first grace's end
        await asyncio.sleep(0.1)
        assert graced.job.cancelled  # t = 0.35

    asyncio.run(scenario())
