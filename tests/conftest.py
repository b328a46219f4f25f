from __future__ import annotations

import os

# Triton kernels run on CPU tensors in the interpreter; must be set before triton.jit decorates them.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run eager (compiling every tiny model would cost minutes); test_inference_compile.py turns it on.
os.environ.setdefault("DDPM_COMPILE", "off")
# ... and in fp32 on every machine (`auto` picks bf16 only where the CPU has it): tests/test_precision.py covers bf16.
os.environ.setdefault("DDPM_PRECISION", "fp32")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from ddpm.unet import UNet
from tests.app_client import app_client, wait_ready
from tests.tiny_model import random_tiny_unet, save_tiny_model

# `make test` runs the suite in parallel (pytest-xdist, --dist loadfile: a file's tests on one worker, in order,
# sharing its module fixtures). The files below cost most of the suite's time on a fresh 2-core machine
# (cold inductor cache and image build; measured with --durations, README "Tests"): they go out first, so
# that no worker is left with one of them at the end while the others idle.
SLOW_FILES = (
    "test_container.py",
    "test_compile_cache.py",
    "test_background_compile.py",
    "test_inference_compile.py",
    "test_precision.py",
    "test_gpu_check.py",
    "test_shipped_model.py",
    "test_load_balancer.py",
    "test_server_process.py",
    "test_chaos.py",
    "test_train.py",
)
# The files that compile the tiny U-Net (fp32, batch 1 and 2+) and the step twin in the shared inductor cache go
# to one worker, one after another: the first builds the graphs, the next load them (measured cold, each file
# alone, on a 2-core AVX-512 EPYC: 77 + 91 + 49 s; in this order on one cache 77 + 55 + 43 s). On two workers
# at once both would build the same graphs.
COMPILE_TOGETHER = ("test_background_compile.py", "test_inference_compile.py", "test_precision.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # schemathesis (4.32 under pytest 9) gives every API operation's test one node id, and xdist tells tests apart
    # by it: all but one operation went unfuzzed (tests/test_fuzz_api.py counts the operations it reached)
    for item in items:
        label = getattr(item, "operation_label", None)
        if label and not item.nodeid.endswith("]"):
            if hasattr(item, "_id"):  # pytest 9: a structured id
                item._id = item._id.with_params(label)
            else:  # pytest 8
                item._nodeid = f"{item.nodeid}[{label}]"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(SLOW_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: file order within a rank


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest alone (the GPU machine has no xdist) must not refuse it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """--dist loadfile with the COMPILE_TOGETHER files as one unit of work (otherwise per file)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class CompileTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "compile-together" if Path(scope).name in COMPILE_TOGETHER else scope

    return CompileTogether(config, log)  # type: ignore[arg-type]


# One torch thread team per core, not one per worker per core; and the same number in the worker's child
# processes (`ddpm sample` in a test compared with the in-process sampler: GEMM's sums change with it, ~2e-5).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def tiny_unet() -> UNet:
    return random_tiny_unet()


# The tiny model served in-process, for the modules that take these (a module's own fixture of the same
# name wins): its directory (T = 200) and a ready client; module-scoped, one of each per module.
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=200)


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with app_client(model_dir, max_images_per_request=4) as c:
        wait_ready(c)
        yield c
