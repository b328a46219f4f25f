"""`ddpm serve` on a read-only root filesystem with one writable tmpfs, as the container runs it
(compose `read_only: true` + tmpfs /tmp; Kubernetes `readOnlyRootFilesystem` + an emptyDir on /tmp).

The server runs inside a user + mount namespace (`unshare -rm`) in which every mount is remounted
read-only and a fresh tmpfs is the only writable place; the compiled hot path (inductor's C++ build
and cache) must work there, and the server must serve.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from ddpm.inference_compile import cpu_compiler_available
from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model

SANDBOX = r"""
set -e
for m in $(findmnt -rn -o TARGET | grep -v '^/proc\|^/sys\|^/dev'); do mount -o remount,bind,ro "$m" 2>/dev/null || true; done
mount -t tmpfs tmpfs "$DDPM_RW"
if touch "$DDPM_PROBE" 2>/dev/null; then echo "the sandbox is not read-only" >&2; exit 3; fi
exec "$@"
"""


def _sandbox_works() -> bool:
    if not (shutil.which("unshare") and shutil.which("findmnt")):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _sandbox_works(), reason="user + mount namespaces (unshare -rm) are not available here")
def test_serves_from_a_read_only_root_with_only_a_tmpfs_writable(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=100)
    rw = tmp_path / "rw"
    rw.mkdir()
    env = {
        "DDPM_RW": str(rw),
        "DDPM_PROBE": str(tmp_path / "probe"),  # the test's own directory: must be read-only inside
        "TMPDIR": str(rw),
        "TORCHINDUCTOR_CACHE_DIR": str(rw / "torchinductor"),
        "TRITON_CACHE_DIR": str(rw / "triton"),
        "MPLCONFIGDIR": str(rw / "matplotlib"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "DDPM_COMPILE": "auto",  # the default hot path, with its compiler and cache
        "DDPM_MAX_BATCH": "1",  # warm-up compiles batch 1 only (cold: every graph costs ~30 s of g++ on 2 cores)
    }
    server = ServerProcess(model, prefix=["unshare", "-rm", "sh", "-c", SANDBOX, "sandbox"], **env)
    try:
        server.wait_ready(timeout=300)
        r = httpx.post(server.url + "/generate", json={"seed": 3, "batch_size": 2, "steps": 5}, timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        if cpu_compiler_available():  # built behind the eager path (service/engine/background_compile.py), in the sandbox's cache
            server.wait_metric('ddpm_hot_path_compiled{batch="2+"}', lambda v: v == 1, timeout=300)
        info = next(line for line in httpx.get(server.url + "/metrics").text.splitlines() if line.startswith("ddpm_model_info{"))
        assert f'compiled="{str(cpu_compiler_available()).lower()}"' in info  # .ci/run installs g++: true in CI
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.output()
    finally:
        server.stop()
    assert not (tmp_path / "probe").exists()
