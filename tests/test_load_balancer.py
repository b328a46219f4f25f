"""The project's own nginx config, run by Debian's nginx in front of real `ddpm serve` replicas."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.nginx_process import NginxProcess, nginx_or_skip
from tests.server_process import ServerProcess, free_port
from tests.tiny_model import save_tiny_model

CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nginx.conf"
nginx_or_skip(module=True)


def render_config(ports: list[int], listen: int, tmp: Path) -> Path:
    """deploy/nginx/nginx.conf with the replicas' loopback addresses and the test's own paths."""
    lines = []
    for line in CONF.read_text().splitlines():
        if "# @upstreams" in line:
            indent = line[: len(line) - len(line.lstrip())]
            lines += [f"{indent}server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in ports]
        elif "# @listen" in line:
            lines.append(line.replace("listen 8080;", f"listen 127.0.0.1:{listen};"))
        else:
            lines.append(line.replace("/tmp/nginx", str(tmp / "nginx")))
    path = tmp / "nginx.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


class Balancer:
    def __init__(self, ports: list[int], tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.nginx = NginxProcess(render_config(ports, self.port, tmp), tmp, self.url + "/healthz")

    def stop(self) -> None:
        self.nginx.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def _cluster(model: Path, tmp_path: Path) -> Iterator[tuple[list[ServerProcess], Balancer]]:
    replicas = [ServerProcess(model), ServerProcess(model)]
    for r in replicas:
        r.wait_ready()
    lb = Balancer([r.port for r in replicas], tmp_path)
    yield replicas, lb
    lb.stop()
    for r in replicas:
        r.stop()


@pytest.fixture
def cluster(model: Path, tmp_path: Path) -> Iterator[tuple[list[ServerProcess], Balancer]]:
    """Two replicas and nginx of the test's own: for the tests that drain or kill a replica."""
    yield from _cluster(model, tmp_path)


@pytest.fixture(scope="module")
def shared_cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[ServerProcess], Balancer]]:
    """One cluster for the tests that leave it as they found it (each cluster is two server starts, ~6 s)."""
    yield from _cluster(model, tmp_path_factory.mktemp("lb"))


def _ok(replica: ServerProcess) -> float:
    return replica.metric('ddpm_requests_total{code="200"}')


def _post(lb: Balancer, steps: int = 60, seed: int = 1) -> int:
    try:
        return httpx.post(lb.url + "/generate", json={"seed": seed, "steps": steps}, timeout=60).status_code
    except httpx.HTTPError:
        return -1


def _concurrently(n: int, fn) -> list[int]:  # type: ignore[no-untyped-def]
    results: list[int] = [0] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_requests_spread_across_replicas(shared_cluster: tuple[list[ServerProcess], Balancer]) -> None:
    replicas, lb = shared_cluster
    before = [_ok(r) for r in replicas]
    codes = _concurrently(12, lambda i: _post(lb, steps=100, seed=i))
    assert codes == [200] * 12
    served = [_ok(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == 12 and min(served) >= 2, served


def test_request_ids_pass_through_nginx(shared_cluster: tuple[list[ServerProcess], Balancer]) -> None:
    """The client's X-Request-ID comes back unchanged and is what the replica logs; without one, nginx's
    id is the one the replica logs and answers with. A W3C traceparent passes through to the replica's line."""
    replicas, lb = shared_cluster
    mine = "client-trace:42.abc"
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    r = httpx.post(lb.url + "/generate", json={"seed": 1, "steps": 5}, headers={"X-Request-ID": mine, **trace}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == mine
    theirs = httpx.post(lb.url + "/generate", json={"seed": 2, "steps": 5}, timeout=60).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", theirs)  # nginx's $request_id
    time.sleep(0.2)
    logs = "".join(replica.output() for replica in replicas)
    assert f'"request_id": "{mine}"' in logs and f'"request_id": "{theirs}"' in logs
    assert '"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"' in logs  # the access line joins the client's trace


def test_draining_replica_gets_no_new_work(cluster: tuple[list[ServerProcess], Balancer]) -> None:
    (a, b), lb = cluster
    long: dict[str, int] = {}

    def long_request() -> None:
        long["code"] = httpx.post(a.url + "/generate", json={"seed": 9, "steps": 1000}, timeout=120).status_code

    t = threading.Thread(target=long_request)
    t.start()
    a.wait_metric("ddpm_running_samples", lambda v: v == 1)
    a.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    before_b = _ok(b)
    codes = _concurrently(6, lambda i: _post(lb, steps=20, seed=i))
    assert codes == [200] * 6
    assert _ok(b) - before_b == 6  # all of them went to the replica that is not draining
    t.join(120)
    assert long["code"] == 200  # the draining replica finished what it had
    assert a.proc.wait(30) == 0


def test_killed_replica_loses_only_what_it_held(cluster: tuple[list[ServerProcess], Balancer]) -> None:
    (a, b), lb = cluster
    results: list[int] = []
    lock = threading.Lock()
    killed = threading.Event()
    after_kill: list[int] = []

    def client(i: int) -> int:
        for j in range(6):
            sent_after_kill = killed.is_set()
            code = _post(lb, steps=80, seed=100 * i + j)
            with lock:
                results.append(code)
                if sent_after_kill:
                    after_kill.append(code)
        return 0

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    a.wait_metric("ddpm_running_samples", lambda v: v >= 1)
    a.proc.kill()
    killed.set()
    for t in threads:
        t.join()
    failures = [c for c in results if c != 200]
    assert len(results) == 24
    assert len(failures) <= 4  # at most the requests the killed replica held (4 clients, one request each)
    assert after_kill and all(c == 200 for c in after_kill)  # nothing sent after the kill was lost
    assert _ok(b) >= len(after_kill)  # the survivor served everything sent after the kill


def test_operator_endpoints_are_not_published(shared_cluster: tuple[list[ServerProcess], Balancer]) -> None:
    (a, _), lb = shared_cluster
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert httpx.get(lb.url + path, timeout=10).status_code == 404, path
        assert httpx.get(a.url + path, timeout=10).status_code == 200, path  # still on the replica's own port
    assert httpx.get(lb.url + "/healthz", timeout=10).status_code == 200


def _png_with_metadata(pixels: np.ndarray, mode: str, metadata_bytes: int) -> str:
    """A base64 PNG carrying ``metadata_bytes`` of XMP in an iTXt chunk, as an image editor saves one."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "x" * metadata_bytes)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def test_an_edit_a_replica_takes_passes_the_balancer(shared_cluster: tuple[list[ServerProcess], Balancer]) -> None:
    """nginx's body limit was 64k ("a generate request is a few dozen bytes", written before editing): an edit whose
    PNGs carry 30 KB of metadata each, within the replica's own bound (191 KiB), got nginx's HTML 413."""
    (a, _), lb = shared_cluster
    keep = np.full((8, 8, 4), 255, np.uint8)
    keep[:, 4:, 3] = 0  # the right half transparent: to repaint
    body = {"seed": 0, "steps": 2, "sampler": "ddim", "jump_n_sample": 1,
            "image": _png_with_metadata(np.zeros((8, 8), np.uint8), "L", 30_000),
            "mask": _png_with_metadata(keep, "RGBA", 30_000)}  # fmt: skip
    assert 64 * 1024 < len(json.dumps(body)) < httpx.get(a.url + "/info", timeout=10).json()["limits"]["max_body_bytes"]
    r = httpx.post(lb.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text[:200]


def test_the_balancers_own_answers_are_json(shared_cluster: tuple[list[ServerProcess], Balancer], tmp_path: Path) -> None:
    """What nginx answers itself (a body over its limit, an unpublished path, no replica reachable) is JSON that both
    kinds of client read (``detail``; OpenAI's ``error.message``), not nginx's HTML page; the 502 says when to retry."""
    _, lb = shared_cluster
    answers = {413: httpx.post(lb.url + "/generate", content=b"{" + b" " * (9 * 2**20) + b"}",
                               headers={"content-type": "application/json"}, timeout=60),
               404: httpx.get(lb.url + "/metrics", timeout=10)}  # fmt: skip
    nobody = Balancer([free_port()], tmp_path)  # an upstream where nothing listens: every replica down
    try:
        answers[502] = httpx.post(nobody.url + "/generate", json={"seed": 0}, timeout=30)
    finally:
        nobody.stop()
    for status, r in answers.items():
        assert r.status_code == status and r.headers["content-type"] == "application/json", (status, r.text[:200])
        assert r.json()["detail"] == r.json()["error"]["message"] and r.json()["detail"], status
    assert answers[502].headers["retry-after"] == "2"
