"""No request body holds the event loop: a 16 MiB body (the body limit raised to 32 MiB) of any shape is
refused or answered while /healthz, polled beside it, keeps answering (the hostile review's round four
saw 17 s). The JSON checks are linear and in C (``service.api.strict_json``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.strict_json import MAX_STRUCTURE, loads_strict, nesting_depth
from tests.server_process import ServerProcess

MIB = 2**20
BODIES = {
    "an array of 8 Mi numbers": json.dumps({"seed": 1, "junk": [1] * (8 * MIB)}),
    "a 16 MiB string in an unknown field": json.dumps({"seed": 1, "junk": "A" * (16 * MIB)}),
    "a 16 MiB image": json.dumps({"seed": 1, "image": "A" * (16 * MIB - 64)}),
    "16 MiB of escaped quotes": json.dumps({"seed": 1, "junk": '\\"' * (4 * MIB)}),
    "16 MiB of nesting": '{"seed": 1, "junk": ' + "[" * (8 * MIB) + "]" * (8 * MIB) + "}",
}


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(model_dir, DDPM_MAX_BODY_BYTES=str(32 * MIB))
    s.wait_ready()
    yield s
    s.stop()


@pytest.mark.parametrize("name", list(BODIES))
def test_a_16_mib_body_does_not_hold_the_event_loop(server: ServerProcess, name: str) -> None:
    body = BODIES[name].encode()
    assert 15 * MIB < len(body) <= 32 * MIB
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        answer["r"] = httpx.post(server.url + "/generate", content=body, headers={"Content-Type": "application/json"}, timeout=60)

    sender = threading.Thread(target=send)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        sender.start()
        while sender.is_alive():
            start = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.005)
    r = answer["r"]
    print(f"\n{name}: /healthz max {max(latencies) * 1000:.0f} ms over {len(latencies)} probes, answer {r.status_code}")
    assert r.status_code == 422 and len(r.content) < 4096, r.text[:500]  # the echo does not send 16 MiB back
    # ~100 ms is the aim (measured in BENCHMARKS/RELIABILITY); the bound leaves room for a loaded CI machine
    assert max(latencies) < 0.5, f"/healthz took {max(latencies):.3f} s beside {name}"


def test_the_depth_check_is_exact_on_escapes_and_strings() -> None:
    cases = {
        b'{"a": [1, [2]]}': 3,
        b'{"a": "[[[\\"[["}': 1,  # brackets and an escaped quote inside a string
        b'{"a": "x\\\\", "b": [[1]]}': 3,  # an escaped backslash ends the string
        json.dumps({"a": '\\"[[[', "b": [[[]]]}).encode(): 4,
    }
    for text, depth in cases.items():
        assert nesting_depth(text) == depth, text


def test_too_many_values_are_refused_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.exceptions import RequestValidationError

    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(RequestValidationError, match="json_too_large"):
        loads_strict(json.dumps([0] * (MAX_STRUCTURE + 1)).encode())
