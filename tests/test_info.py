"""GET /info against independent computations, the OpenAPI bearer scheme, and the fleet metrics:
process metrics, the model label, GPU memory gauges."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from ddpm import __version__
from ddpm.checkpoint import load_model
from service.metrics import Metrics
from tests.app_client import app_client, metric, wait_ready
from tests.prometheus_text import sample_value
from tests.tiny_model import TINY, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=40)


def _independent_flops(module: torch.nn.Module) -> int:
    """Count 2 * multiply-adds of every Conv2d and Linear by forward hooks, plus each attention block's
    two matmuls (q k^T and attn v: 2 * L * L * C each, L = H * W positions)."""
    from ddpm.unet import AttnBlock

    total = 0

    def attention(m: AttnBlock, inp: tuple[torch.Tensor], _out: object) -> None:
        nonlocal total
        _, c, h, w = inp[0].shape
        total += 2 * (2 * (h * w) ** 2 * c)

    def conv(m: torch.nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: torch.nn.Linear, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(linear) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_hook(attention) for m in module.modules() if isinstance(m, AttnBlock)]
    with torch.no_grad():
        module(torch.zeros(1, TINY.in_channels, TINY.image_size, TINY.image_size), torch.zeros(1, dtype=torch.long))
    for h in hooks:
        h.remove()
    return total


def test_info_describes_the_model_and_the_replica(model_dir: Path) -> None:
    with app_client(model_dir, compile="off", max_images_per_request=12, response_cache_mb=2) as c:
        wait_ready(c)
        info = c.get("/info").json()
    module, _ = load_model(model_dir)
    assert info["version"] == __version__
    m = info["model"]
    assert m["name"] == "tiny" and m["source"] == "ddpm-serve"
    assert m["weights_sha256"] == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert m["parameters"] == sum(p.numel() for p in module.parameters())
    assert m["gflop_per_image_step"] == pytest.approx(_independent_flops(module) / 1e9, rel=1e-3)
    assert m["image_shape"] == [1, 8, 8] and m["num_timesteps"] == 40 and m["schedule"] == "linear"
    assert m["variance_type"] == "fixed_small" and m["clip_denoised"] is True and m["timestep_spacing"] is None
    assert info["samplers"] == ["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++", "restart"]
    assert info["defaults"] == {"sampler": "restart", "steps": 10, "timestep_spacing": "trailing"}
    assert info["limits"]["max_images_per_request"] == 12 and info["limits"]["max_batch"] == 8
    assert info["device"] == "cpu" and info["compiled"] is False and info["step_backend"] == "torch" and info["precision"] == "fp32"
    assert info["response_cache_bytes"] == 2 * 2**20


def test_info_needs_the_token_and_the_schema_declares_the_bearer_scheme(model_dir: Path) -> None:
    with app_client(model_dir, compile="off", api_token="tok") as c:
        wait_ready(c)
        assert c.get("/info").status_code == 401
        assert c.get("/info", headers={"Authorization": "Bearer tok"}).status_code == 200
        spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }  # fmt: skip
    guarded = [("/generate", "post"), ("/generate/stream", "post"), ("/v1/images/generations", "post"), ("/info", "get"),
               ("/schedule", "get"), ("/v1/models", "get")]  # fmt: skip
    for path, method in guarded:
        assert spec["paths"][path][method]["security"] == [{"bearer": []}], path
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}, {}]  # open unless DDPM_METRICS_REQUIRE_TOKEN
    assert "security" not in spec["paths"]["/healthz"]["get"]
    with app_client(model_dir, compile="off") as open_server:  # no token: the scheme is declared, and optional
        spec = open_server.get("/openapi.json").json()
    for path, method in guarded:
        assert spec["paths"][path][method]["security"] == [{"bearer": []}, {}], path


def test_fleet_metrics(model_dir: Path) -> None:
    with app_client(model_dir, compile="off") as c:
        wait_ready(c)
        assert c.post("/generate", json={"seed": 1, "steps": 3}).status_code == 200
        assert c.post("/generate", json={"seed": 1, "steps": 0}).status_code == 422
        assert c.get("/nowhere").status_code == 404
        text = c.get("/metrics").text
        assert metric(c, "process_resident_memory_bytes") > 10 * 2**20
        assert metric(c, "process_open_fds") > 0 and metric(c, "process_cpu_seconds_total") > 0
    assert "python_info{" in text
    # the model label, as vLLM / Triton put theirs
    assert sample_value(text, 'ddpm_requests_total{code="200",model="tiny"}') == 1
    assert sample_value(text, 'ddpm_requests_total{code="422",model="tiny"}') == 1
    assert sample_value(text, 'ddpm_image_steps_total{model="tiny",sampler="restart"}') == 3
    assert sample_value(text, 'ddpm_images_generated_total{model="tiny"}') == 1
    # every response by code, unknown routes included
    assert sample_value(text, 'ddpm_http_responses_total{route="other",code="404"}') == 1
    assert "ddpm_gpu_memory" not in text  # CPU: no GPU gauges


def test_gpu_memory_gauges_read_the_allocator_at_scrape_time() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics(model="m")
    readings = {"memory_allocated": 100, "memory_reserved": 200, "max_memory_allocated": 150}
    props = mock.Mock(total_memory=1000)
    with mock.patch.multiple(torch.cuda, **{k: mock.Mock(return_value=v) for k, v in readings.items()},
                             get_device_properties=mock.Mock(return_value=props)):  # fmt: skip
        metrics.watch_gpu(torch.device("cuda", 1))
        text = generate_latest(metrics.registry).decode()
        readings_later = {"memory_allocated": 120}
        with mock.patch.object(torch.cuda, "memory_allocated", mock.Mock(return_value=readings_later["memory_allocated"])):
            later = generate_latest(metrics.registry).decode()
    assert sample_value(text, 'ddpm_gpu_memory_allocated_bytes{device="cuda:1"}') == 100
    assert sample_value(text, 'ddpm_gpu_memory_reserved_bytes{device="cuda:1"}') == 200
    assert sample_value(text, 'ddpm_gpu_memory_peak_allocated_bytes{device="cuda:1"}') == 150
    assert sample_value(text, 'ddpm_gpu_memory_total_bytes{device="cuda:1"}') == 1000
    assert sample_value(later, 'ddpm_gpu_memory_allocated_bytes{device="cuda:1"}') == 120


def test_counting_flops_touches_no_global_module_hooks() -> None:
    """/info counts the U-Net's FLOPs on first use, possibly while torch.compile traces the U-Net in
    another thread: global module hooks (FlopCounterMode's module tracker) made dynamo fail that compile."""
    from torch.nn.modules import module as nn_module

    from ddpm.model_facts import flops_per_image_step
    from tests.tiny_model import random_tiny_unet

    unet = random_tiny_unet()
    seen: list[int] = []

    def eps(x, t):  # type: ignore[no-untyped-def]
        seen.append(len(nn_module._global_forward_pre_hooks) + len(nn_module._global_forward_hooks))
        return unet(x, t)

    flops = flops_per_image_step(eps, (1, 8, 8), torch.device("cpu"))
    assert seen == [0] and flops > 0
    with torch.utils.flop_counter.FlopCounterMode(display=False) as reference:  # the same formulas, the same count
        unet(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert flops == reference.get_total_flops()


def test_a_server_that_compiles_nothing_never_imports_dynamo(model_dir: Path) -> None:
    """torch._dynamo's import costs ~1.8 s (2-core AVX2 EPYC). A TorchDispatchMode wraps its ``__torch_dispatch__`` in
    dynamo.disable, which imports dynamo on the first call: the FLOP count made every compile-off server pay that
    before ready (a tiny model's start 5.9 -> 4.0 s without it). In a fresh interpreter: dynamo is in no import chain
    of a server that serves eagerly."""
    code = (
        "import sys\n"
        "from tests.app_client import app_client, wait_ready\n"
        f"with app_client({str(model_dir)!r}, compile='off') as c:\n"
        "    wait_ready(c)\n"
        "    assert c.post('/generate', json={'seed': 1, 'steps': 2}).status_code == 200\n"
        "    gflop = c.get('/info').json()['model']['gflop_per_image_step']\n"
        "print(gflop, 'torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    gflop, dynamo = done.stdout.split()
    assert float(gflop) > 0 and dynamo == "False", done.stdout
