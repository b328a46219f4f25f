"""Serving needs only the runtime dependencies: with every training, evaluation and GPU-only package
made unimportable, the server loads a model and answers, and the training commands say what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.tiny_model import save_tiny_model

# the [train] extra and what it pulls in, the [gpu] extra, and the test-only packages
NOT_FOR_SERVING = [
    "mlxtend", "scipy", "matplotlib", "pandas", "sklearn", "sympy", "triton", "diffusers", "huggingface_hub", "pytest", "selenium",
    "openai",
]  # fmt: skip

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = set(sys.argv[1].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not a serving dependency")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, ",".join(NOT_FOR_SERVING), *args], capture_output=True, text=True, timeout=300)


def test_the_server_serves_without_training_or_gpu_packages(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=50)
    result = _run(
        """
        import time
        from fastapi.testclient import TestClient
        from service.api.app import create_app
        from service.settings import Settings

        with TestClient(create_app(Settings(model=sys.argv[2], warmup_steps=1, max_batch=4, compile="off"))) as c:
            end = time.monotonic() + 120
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < end, c.get("/readyz").json()
                time.sleep(0.05)
            for sampler in ("ddpm", "dpmsolver++"):
                r = c.post("/generate", json={"seed": 1, "batch_size": 2, "steps": 5, "sampler": sampler})
                assert r.status_code == 200, r.text
            assert c.get("/metrics").status_code == 200
        print("served", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
        """,
        str(model),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served []" in result.stdout


def test_training_commands_name_the_extra_they_need() -> None:
    result = _run(
        """
        from commands.main import main
        main(["eval", "-n", "2"])
        """
    )
    assert result.returncode != 0
    assert "pip install 'ddpm-serve[train]'" in result.stderr and "mlxtend" in result.stderr


def test_a_forced_triton_backend_without_triton_says_what_to_install(tmp_path: Path) -> None:
    """DDPM_STEP_BACKEND=triton where triton is missing fails when sampling or serving starts, naming the
    extra that installs it (not at the first step with a message about CUDA tensors)."""
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=30)
    sample = _run(
        """
        import os
        os.environ.update(DDPM_STEP_BACKEND="triton", TRITON_INTERPRET="1")
        from commands.main import main
        sys.argv = ["ddpm", "sample", "--model", sys.argv[2], "-n", "1", "--steps", "2", "-o", sys.argv[3], "--quiet"]
        main()
        """,
        str(model),
        str(tmp_path / "x.png"),
    )
    assert sample.returncode != 0 and "triton is not installed: pip install 'ddpm-serve[gpu]'" in sample.stderr, sample.stderr
    assert "Traceback" not in sample.stderr and not (tmp_path / "x.png").exists()
    serve = _run(
        """
        from service.server_state import ServerState
        from service.settings import Settings

        state = ServerState(Settings(model=sys.argv[2], step_backend="triton", compile="off"))
        state.start_loading()
        state.wait_loaded(120)
        print(state.load_error)
        """,
        str(model),
    )
    assert serve.returncode == 0 and "triton is not installed: pip install 'ddpm-serve[gpu]'" in serve.stdout, serve.stdout + serve.stderr
