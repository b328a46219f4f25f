"""Freed heap goes back to the OS (service/engine/heap_trim.py): for real on glibc, and when the engine does it."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import ImageRequest
from service.engine import engine as engine_module
from service.engine.engine import Engine
from service.engine.heap_trim import _malloc_trim, release_free_heap
from service.engine.job import Job
from tests.engine_jobs import wait_done
from tests.tiny_model import tiny_loaded_model


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="not glibc: there is no malloc_trim to call")
def test_freed_heap_pages_leave_the_process() -> None:
    """192 MiB in 64 KiB blocks (under glibc's mmap threshold: heap, not mmap), written, then freed but for the last
    block (so the heap's top stays: free() returns nothing from its middle): resident until the trim, gone after it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(3072)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    before = _rss_mib()
    for block in blocks[:-1]:
        libc.free(block)
    freed = _rss_mib()
    assert release_free_heap()
    after = _rss_mib()
    libc.free(blocks[-1])
    assert before - freed < 32, (before, freed)  # free() kept the pages
    assert freed - after > 150, (before, freed, after)  # the trim returned them


def test_the_engine_trims_once_when_idle_after_work_never_while_it_works(
    tiny_unet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = Engine(tiny_loaded_model(tiny_unet), max_batch=4)
    e.heap_trim_after_s = 0.3
    trims: list[tuple[float, bool]] = []
    monkeypatch.setattr(engine_module, "release_free_heap", lambda: trims.append((time.monotonic(), e._has_work())) or True)
    e.start()
    try:
        time.sleep(0.5)
        assert trims == []  # nothing ran: nothing to return
        for round_ in (1, 2):
            job = e.submit(Job(ImageRequest(round_, 2, ChainSpec(steps=20)), timeout_s=60))
            wait_done(job)
            done = time.monotonic()
            assert job.error is None
            time.sleep(0.9)
            assert len(trims) == round_  # once per idle spell, not every poll
            at, busy = trims[-1]
            assert not busy and 0.25 <= at - done < 0.8
    finally:
        e.stop()
