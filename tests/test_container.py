"""The image from the Dockerfile, built with podman and run the way the deployment files run it.

Skipped (with the reason) where podman or mmdebstrap is missing; ``.ci/run`` installs them and sets
DDPM_REQUIRE_CONTAINERS=1, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.container_image import CPU_IMAGE_GOAL_BYTES, IMAGE, build, podman, tools_missing
from tests.server_process import ServerProcess, free_port

MISSING = tools_missing()
if MISSING:
    if os.environ.get("DDPM_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"{', '.join(MISSING)} required in CI but not installed", pytrace=False)
    pytest.skip(f"{', '.join(MISSING)} not installed (apt-get install podman mmdebstrap runc)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "mnist-28"
# deterministic and quick to start: eager fp32 on both sides of the byte comparison
SERVING_ENV = {"DDPM_COMPILE": "off", "DDPM_PRECISION": "fp32", "DDPM_THREADS": "1", "DDPM_WARMUP_STEPS": "1", "DDPM_MAX_BATCH": "8"}
# The image's compiled graphs for batch 1 only, and no second (AVX2) set on an AVX-512 machine: the same
# Dockerfile steps (`ddpm compile-cache` in the build, the server loading its output), less compile than a
# release build (the shipped model, cold, on a 2-core AVX2 EPYC: 202 s at max batch 64, 156 s at 4; an
# AVX-512 build machine compiles a second, AVX2 set on top).
COMPILE_ARGS = {"COMPILE_MAX_BATCH": "1", "COMPILE_AVX2_SET": "0"}


@pytest.fixture(scope="module")
def image() -> dict[str, object]:
    report = build(**COMPILE_ARGS)
    print("container build:", json.dumps(report))
    return report


class Container:
    """``podman run`` as docker-compose.yml / the k8s Deployment run the image: read-only root, tmpfs
    /tmp, the image's non-root uid, every capability dropped, no privilege escalation, published on
    loopback only."""

    def __init__(self, image: str, env: dict[str, str] | None = None, volumes: list[str] | None = None,
                 verify: ssl.SSLContext | None = None) -> None:  # fmt: skip
        """``verify``: the server speaks TLS (DDPM_TLS_* in ``env``), its certificate trusted by this context."""
        self.port = free_port()
        self.url = f"{'https' if verify else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = verify or True
        args = ["run", "-d", "--read-only", "--tmpfs", "/tmp:rw,size=512m", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "-p", f"127.0.0.1:{self.port}:8000"]  # fmt: skip
        for key, value in {**SERVING_ENV, **(env or {})}.items():
            args += ["-e", f"{key}={value}"]
        for volume in volumes or []:
            args += ["-v", volume]
        self.id = podman(*args, image).stdout.strip()

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            state = podman("inspect", self.id, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running", f"container {state}: {self.logs()[-3000:]}"
            try:
                if httpx.get(self.url + "/readyz", timeout=1, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"container not ready: {self.logs()[-3000:]}")

    def logs(self) -> str:
        result = podman("logs", self.id, check=False)
        return result.stdout + result.stderr

    def exit_code(self) -> int:
        return int(podman("inspect", self.id, "--format", "{{.State.ExitCode}}").stdout.strip())

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.id, check=False)


# what a Docker client's configured proxies put into every container it starts: the image's HEALTHCHECK went through
# it to 127.0.0.1 and said unhealthy while the server answered /readyz 200 (measured on the image before)
INJECTED_PROXY = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "example.com"}


@pytest.fixture
def container(image: dict[str, object]) -> Iterator[Container]:
    c = Container(str(image["image"]), env=INJECTED_PROXY)
    yield c
    c.remove()


def test_the_image_starts_warm(image: dict[str, object]) -> None:
    """The image carries the shipped model's compiled graphs for this CPU: with the server's defaults
    (compile auto, precision auto; the batch sizes the test image's graphs cover) it loads them and
    reaches the compiled path by itself."""
    defaults = {"DDPM_COMPILE": "auto", "DDPM_PRECISION": "auto", "DDPM_MAX_BATCH": COMPILE_ARGS["COMPILE_MAX_BATCH"],
                "DDPM_WARMUP_STEPS": "2", "DDPM_THREADS": "0"}  # fmt: skip
    c = Container(str(image["image"]), env=defaults)
    try:
        start = time.monotonic()
        c.wait_ready()
        ready_s = time.monotonic() - start
        end = time.monotonic() + 600
        while not httpx.get(c.url + "/info", timeout=60).json()["compiled"]:
            assert time.monotonic() < end, c.logs()[-3000:]
            time.sleep(0.5)
        compiled_s = time.monotonic() - start
        logs = c.logs()
    finally:
        c.remove()
    print(f"image start: ready {ready_s:.1f} s, compiled {compiled_s:.1f} s")
    assert "loaded compiled graphs from /app/compile-cache" in logs, logs[-3000:]


def test_the_cpu_image_holds_only_what_serving_needs(image: dict[str, object]) -> None:
    assert image["size_bytes"] <= CPU_IMAGE_GOAL_BYTES, image  # type: ignore[operator]
    absent = ("triton", "mlxtend", "scipy", "matplotlib", "pandas", "sklearn", "pip")
    probe = f"import importlib.util as u; print([m for m in {absent!r} if u.find_spec(m)])"
    assert podman("run", "--rm", IMAGE, "python", "-c", probe).stdout.strip() == "[]"
    # what serving can be asked to do without a rebuild: DDPM_OTLP_TRACES_ENDPOINT's exporter (the [otel] extra)
    present = "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.http.trace_exporter; print('ok')"
    assert podman("run", "--rm", IMAGE, "python", "-c", present).stdout.strip() == "ok"
    user = podman("image", "inspect", IMAGE, "--format", "{{.Config.User}} {{json .Config.Healthcheck.Test}}").stdout
    assert user.startswith("10001:10001") and "service.health_probe" in user  # Docker format keeps the HEALTHCHECK


def test_a_cpu_limit_caps_the_servers_threads_and_a_memory_limit_is_read(image: dict[str, object]) -> None:
    """``--cpus 1`` as a container's cgroup shows it: the quota read, and PyTorch's default thread count (one per core
    here) capped at it (ddpm/cpu_quota.py; tests/test_cpu_quota.py lays out the other layouts)."""
    probe = "import torch; from ddpm.cpu_quota import cpu_quota as q, threads_within_quota as t; " \
            "print(q(), t(torch.get_num_threads(), q()))"
    assert podman("run", "--rm", "--cpus", "1", IMAGE, "python", "-c", probe).stdout.split() == ["1.0", "1"]
    if (os.cpu_count() or 1) >= 2:  # podman refuses more CPUs than the machine has
        assert podman("run", "--rm", "--cpus", "1.5", IMAGE, "python", "-c", probe).stdout.split() == ["1.5", "1"]
    assert podman("run", "--rm", IMAGE, "python", "-c", probe).stdout.split()[0] == "None"
    # the memory gauges' source (service/container_memory.py): the limit, and a working set inside it
    probe = "from service.container_memory import memory_limit as m, memory_working_set as w; print(m(), 0 < w() < m())"
    assert podman("run", "--rm", "--memory", "1g", IMAGE, "python", "-c", probe).stdout.split() == [str(2**30), "True"]


def test_it_serves_the_shipped_model_byte_identical_to_ddpm_serve_outside(container: Container) -> None:
    container.wait_ready()
    body = {"seed": 11, "batch_size": 2, "steps": 6, "sampler": "dpmsolver++"}
    inside = httpx.post(container.url + "/generate", json=body, timeout=120)
    assert inside.status_code == 200, inside.text
    outside_server = ServerProcess(SHIPPED, **SERVING_ENV)
    try:
        outside_server.wait_ready(120)
        outside = httpx.post(outside_server.url + "/generate", json=body, timeout=120)
    finally:
        outside_server.stop()
    assert inside.json()["images"] == outside.json()["images"]  # the same PNG bytes, base64
    assert inside.json()["model"] == "mnist-28"
    # the image's HEALTHCHECK, run by podman itself (past the container's proxy settings)
    assert podman("healthcheck", "run", container.id, check=False).returncode == 0


def test_the_image_serves_tls_from_a_mounted_secret_and_its_health_check_speaks_it(image: dict[str, object], tmp_path: Path) -> None:
    """A Secret mounted read-only as Kubernetes does (the files root's, readable by all), the proxy a Docker client
    injects: ready over https, and the image's HEALTHCHECK healthy (its plain probe read the TLS server as down)."""
    from tests.tls_pairs import tls_pair

    cert, key = tls_pair(tmp_path / "secret", "tls")
    key.chmod(0o644)  # a Secret volume's default mode; the container's uid is not the file's owner
    env = {**INJECTED_PROXY, "DDPM_TLS_CERT_FILE": "/etc/ddpm-tls/tls.crt", "DDPM_TLS_KEY_FILE": "/etc/ddpm-tls/tls.key"}
    c = Container(str(image["image"]), env=env, volumes=[f"{tmp_path / 'secret'}:/etc/ddpm-tls:ro"],
                  verify=ssl.create_default_context(cafile=cert))  # fmt: skip
    try:
        c.wait_ready()
        answer = httpx.post(c.url + "/generate", json={"seed": 1, "steps": 2}, verify=c.verify, timeout=120)
        assert answer.status_code == 200, answer.text
        assert podman("healthcheck", "run", c.id, check=False).returncode == 0, c.logs()[-2000:]
    finally:
        c.remove()


def test_podman_stop_drains_a_request_in_flight(container: Container) -> None:
    container.wait_ready()
    answer: dict[str, int] = {}
    t = threading.Thread(
        target=lambda: answer.update(code=httpx.post(container.url + "/generate", json={"seed": 1, "steps": 150}, timeout=120).status_code)
    )
    t.start()
    time.sleep(1.0)  # the request is running
    stop = podman("stop", "-t", "60", container.id, timeout=120)
    t.join(120)
    assert answer.get("code") == 200, (answer, container.logs()[-2000:])
    assert stop.returncode == 0 and container.exit_code() == 0, container.logs()[-2000:]


def test_two_containers_behind_the_projects_nginx(image: dict[str, object], tmp_path: Path) -> None:
    from tests.nginx_process import nginx_or_skip

    nginx_or_skip()  # (skipped where absent, failed where CI requires it)
    from tests.test_load_balancer import Balancer

    replicas = [Container(str(image["image"])), Container(str(image["image"]))]
    lb = None
    try:
        for r in replicas:
            r.wait_ready()
        lb = Balancer([r.port for r in replicas], tmp_path)
        codes: list[int] = []
        lock = threading.Lock()

        def post(i: int) -> None:
            try:
                code = httpx.post(
                    lb.url + "/generate", json={"seed": i, "steps": 40}, headers={"X-Request-ID": f"ctr-{i}"}, timeout=120
                ).status_code  # type: ignore[union-attr]
            except httpx.HTTPError:
                code = -1
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 8
        served = [r.logs().count('"path": "/generate"') for r in replicas]
        assert min(served) >= 2, served  # spread over both
        assert '"request_id": "ctr-3"' in replicas[0].logs() + replicas[1].logs()  # the client's id, through nginx

        # one replica stopped mid-load: what it held is answered (drained), new work goes to the other
        codes.clear()
        threads = [threading.Thread(target=post, args=(100 + i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        podman("stop", "-t", "60", replicas[0].id, timeout=120)
        for t in threads:
            t.join()
        assert codes.count(200) == 8, codes
        assert replicas[0].exit_code() == 0
    finally:
        if lb is not None:
            lb.stop()
        for r in replicas:
            r.remove()


def test_a_mounted_diffusers_model_is_served(image: dict[str, object], tmp_path: Path) -> None:
    from tests.test_reverse_chain import _save_diffusers_dir

    model = _save_diffusers_dir(tmp_path / "ddpm-tiny", {"num_train_timesteps": 100, "clip_sample": True})
    os.chmod(tmp_path, 0o755)  # the image's uid 10001 reads the mount
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    c = Container(str(image["image"]), env={"DDPM_MODEL": "/models/ddpm-tiny"}, volumes=[f"{model}:/models/ddpm-tiny:ro"])
    try:
        c.wait_ready()
        r = httpx.post(c.url + "/generate", json={"seed": 3, "steps": 5, "batch_size": 2}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "ddpm-tiny" and len(r.json()["images"]) == 2
    finally:
        c.remove()
