"""The engine's steady loop never reads the device back: which rows finish, whether any row jumps, which
rows are guided are all known on the host (issue 35). On CUDA a read would make the host wait for the
GPU every iteration, so the host could not prepare iteration i+1 while the GPU runs iteration i.

On CPU the test counts what would be a device-to-host read on a GPU: aten's scalar reads (``.item()``,
``bool(t)``, ``int(t)``: ``_local_scalar_dense``, ``is_nonzero``), and ``tolist``/``numpy``/``cpu`` of
a tensor, over every iteration of a batch that mixes every sampler, restart's jumps, inpainting and
SDEdit rows, and rows joining and leaving. On CUDA (the GPU check runs this file) torch's own sync
debug mode raises on any synchronising call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm.chain import ChainSpec
from ddpm.finite_images import finite_rows
from ddpm.image_request import EditInput, ImageRequest
from service.engine import engine as engine_module
from service.engine.engine import Engine
from service.engine.job import Job
from service.engine.previews import preview_after
from tests.tiny_model import random_tiny_unet, tiny_loaded_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALAR_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}


class _ScalarReads(TorchDispatchMode):
    def __init__(self, paused: list[bool]) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.paused = paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in SCALAR_READS and not self.paused[0]:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


_PAUSED = [False]  # reads of what is host memory on a GPU too (the finished images' pinned copy) are not counted


@contextmanager
def _not_counted() -> Iterator[None]:
    _PAUSED[0] = True
    try:
        yield
    finally:
        _PAUSED[0] = False


@contextmanager
def _host_reads() -> Iterator[list[str]]:
    """Every read of a tensor's values into Python or numpy, by name (but those under ``_not_counted``)."""
    reads: list[str] = []
    patched = {}
    for name in ("tolist", "numpy", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        patched[name] = real

        def spy(self, *args, _name=name, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            if not _PAUSED[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, spy)
    real_cpu = torch.Tensor.cpu
    patched["cpu"] = real_cpu

    def cpu(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.device.type != "cpu" and not _PAUSED[0]:
            reads.append("cpu")
        return real_cpu(self, *args, **kwargs)

    torch.Tensor.cpu = cpu  # type: ignore[method-assign]
    mode = _ScalarReads(_PAUSED)
    try:
        with mode:
            yield reads
    finally:
        for name, real in patched.items():
            setattr(torch.Tensor, name, real)
        reads.extend(mode.reads)


def _jobs() -> list[Job]:
    shape = (1, 8, 8)
    mask = torch.ones(shape)
    mask[..., :4] = 0.0
    image = torch.linspace(-1, 1, 64).reshape(shape)
    specs = [
        (ChainSpec(6, "ddpm"), None, None),
        (ChainSpec(5, "dpmsolver++", spacing="trailing"), None, None),
        (ChainSpec(10, "restart", spacing="trailing"), None, None),  # the default chain: a jump in 1 of 10 calls
        (ChainSpec(4, "ddim", eta=0.5, clip=False), None, None),
        (ChainSpec(4, "ddim", repaint=True, jump_length=1, jump_n_sample=2), image, mask),  # inpainting
        (ChainSpec(3, "ddpm", strength=0.5), image, None),  # SDEdit
    ]
    edit = [None if init is None else EditInput.of(init, m) for _, init, m in specs]
    asked = [ImageRequest(i, 2, spec, None, 0.0, edit[i]) for i, (spec, _, _) in enumerate(specs)]
    return [Job(request, timeout_s=600) for request in asked]


def test_the_steady_loop_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_loaded_model(random_tiny_unet().to(DEVICE))  # its device is its parameters'
    engine = Engine(model, max_batch=8)  # 12 images: rows wait, join as others leave
    checked: list[int] = []

    def finite_rows_of_the_host_copy(images: torch.Tensor) -> list[bool]:
        """On a GPU the finished images' pinned host copy, read once its event says the copy is done: no device read."""
        assert images.device.type == "cpu"
        checked.append(len(images))
        with _not_counted():
            return finite_rows(images)

    monkeypatch.setattr(engine_module, "finite_rows", finite_rows_of_the_host_copy)
    previews: list[tuple[int, int, torch.device]] = []
    jobs = _jobs()
    for job in jobs[::2]:  # partial images come to the host as finished images do: no read of the device either
        job.previews, job.on_preview = 2, lambda j, k, index, image: previews.append((j.id, index, image.device))
    jobs = [engine.submit(job) for job in jobs]
    iterations = 0
    with torch.inference_mode():
        engine._iterate()  # the first iteration builds the chain tables (host work done once)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with _host_reads() as reads:
                while not all(job.done for job in jobs[:-1]) and iterations < 200:
                    engine._iterate()
                    iterations += 1
        finally:
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    while not all(job.done for job in jobs):
        engine._iterate()
    assert all(job.error is None for job in jobs), [job.error for job in jobs]
    assert iterations > 10
    assert reads == [], f"{len(reads)} device reads in {iterations} iterations: {sorted(set(reads))}"
    assert sum(checked) == 12  # every finished image was checked for NaN (a black square answered otherwise)
    wanted = sum(len(preview_after(job.calls, 2)) * job.n for job in jobs[::2])
    assert len(previews) == wanted > 0 and {device.type for _, _, device in previews} == {"cpu"}


def test_the_spy_sees_a_read() -> None:
    with _host_reads() as reads:
        bool(torch.ones(2).any())
        torch.arange(3).tolist()
    assert "__bool__" in reads and "tolist" in reads and any("local_scalar_dense" in r or "is_nonzero" in r for r in reads)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch's sync debug mode is CUDA's")
def test_the_sync_debug_mode_is_armed() -> None:
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            torch.ones(2, device="cuda").sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)
