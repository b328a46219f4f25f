"""Schemathesis against the server's own OpenAPI schema: no 5xx, no hang, every answer as documented."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from ddpm.names import SAMPLERS  # noqa: E402
from service.api.app import create_app  # noqa: E402
from service.server_state import ServerState  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402

EXAMPLES = int(os.environ.get("DDPM_FUZZ_EXAMPLES", "300"))  # per operation (RELIABILITY.md: 1000 for a deep run)


def _app(tmp: Path):  # type: ignore[no-untyped-def]
    model = save_tiny_model(tmp / "tiny", num_timesteps=25)
    cfg = Settings(model=model, warmup_steps=1, max_batch=8, max_queue=64, max_images_per_request=2, request_timeout_s=30)
    state = ServerState(cfg)
    state.start_loading()
    state.wait_loaded(60)
    assert state.ready, state.load_error
    return create_app(cfg, state)


CALLS: dict[str, int] = {}  # requests sent per operation (printed by -s; RELIABILITY.md)
_MODEL_DIR = tempfile.TemporaryDirectory(prefix="ddpm-fuzz-")  # removed when the process ends
APP = _app(Path(_MODEL_DIR.name))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case) -> None:  # type: ignore[no-untyped-def]
    response = case.call(timeout=30)
    CALLS[case.operation.label] = CALLS.get(case.operation.label, 0) + 1
    # the one 5xx by design: a deadline_s the predicted wait cannot meet (a fuzzer's 5e-324 s) is refused at once,
    # 503 + Retry-After, so that a load balancer can send it to another replica (README, Scheduling)
    refused = response.status_code == 503 and "past its deadline" in response.text and "retry-after" in response.headers
    assert response.status_code < 500 or refused, (response.status_code, response.text[:300])
    # positive_data_acceptance compares integers as float64, so it takes seeds just above 2^63
    # (9223372036854775998 == 2.0**63 as a float) for valid; the server rightly answers 422. The
    # equivalent check, exact in integers, follows.
    excluded = [schemathesis.checks.positive_data_acceptance]
    if refused:
        excluded.append(schemathesis.checks.not_a_server_error)
    if response.status_code == 413:  # over DDPM_MAX_BODY_BYTES: refused before parsing, which is a rejection too
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded)
    openai = case.path.startswith("/v1/")
    if response.status_code == 422 and isinstance(case.body, dict) and openai:
        assert not _valid_openai_request(case.body), f"a valid request was rejected: {case.body} -> {response.text[:200]}"
    elif response.status_code == 422 and isinstance(case.body, dict):  # (a body not sent as JSON gets 415)
        body = case.body
        eta = body.get("eta")
        valid = (
            set(body) <= {"seed", "batch_size", "steps", "clip_denoised", "sampler", "eta", "timestep_spacing", "class_label",
                          "guidance_scale"}
            and _valid_guidance(body)  # the fuzzed model is unconditional
            and type(body.get("seed")) is int and 0 <= body["seed"] < 2**63
            and type(body.get("batch_size", 1)) is int and 1 <= body.get("batch_size", 1) <= 2
            and (body.get("steps") is None or (type(body["steps"]) is int and 1 <= body["steps"] <= 25))
            and body.get("clip_denoised") in (None, True, False)
            and (type(body.get("clip_denoised")) is bool or body.get("clip_denoised") is None)
            and body.get("sampler") in (None, *SAMPLERS)
            and body.get("timestep_spacing") in (None, "linspace", "leading", "trailing")
            and (eta is None or (type(eta) in (int, float) and 0 <= eta <= 1 and body.get("sampler") == "ddim"))
        )  # fmt: skip
        assert not valid, f"a valid request was rejected: {body} {case.headers} -> {response.text[:200]}"
    if response.status_code >= 400:
        body = response.json()
        if openai:  # OpenAI's error shape
            assert isinstance(body["error"]["message"], str) and body["error"]["message"] and body["error"]["type"], body
        else:
            assert isinstance(body.get("detail"), str) and body["detail"], body


def _valid_guidance(body: dict) -> bool:
    """On an unconditional model: no class_label, and no guidance other than 0."""
    w = body.get("guidance_scale")
    return body.get("class_label") is None and (w is None or (type(w) in (int, float) and w == 0))


def _valid_openai_request(body: dict) -> bool:
    """What /v1/images/generations must accept (422 is for anything else; 400/404 are for a wrong size,
    url format or model name, which are well-formed)."""

    def is_int(v: object) -> bool:
        return type(v) is int

    chain_ok = (
        (body.get("steps") is None or (is_int(body["steps"]) and 1 <= body["steps"] <= 25))
        and body.get("sampler") in (None, *SAMPLERS)
        and body.get("timestep_spacing") in (None, "linspace", "leading", "trailing")
        and (body.get("clip_denoised") is None or type(body["clip_denoised"]) is bool)
        and (body.get("eta") is None or (type(body["eta"]) in (int, float) and 0 <= body["eta"] <= 1 and body.get("sampler") == "ddim"))
        and _valid_guidance(body)
    )  # fmt: skip
    return (
        set(body) <= {"prompt", "model", "n", "size", "response_format", "user", "seed", "steps", "sampler", "eta",
                      "timestep_spacing", "clip_denoised", "class_label", "guidance_scale"}
        and isinstance(body.get("prompt"), str) and len(body["prompt"]) <= 4000
        and (body.get("model") is None or isinstance(body["model"], str))
        and (body.get("size") is None or isinstance(body["size"], str))
        and body.get("response_format") in (None, "b64_json", "url")
        and (body.get("user") is None or (isinstance(body["user"], str) and len(body["user"]) <= 256))
        and is_int(body.get("n", 1)) and 1 <= body.get("n", 1) <= 2
        and (body.get("seed") is None or (is_int(body["seed"]) and 0 <= body["seed"] < 2**63))
        and chain_ok
    )  # fmt: skip


def test_fuzzing_sent_many_requests() -> None:
    print("fuzz requests per operation:", CALLS)
    operations = {result.ok().label for result in schema.get_all_operations()}
    assert set(CALLS) == operations, operations - set(CALLS)  # every operation fuzzed (xdist once ran only the first)
    assert sum(CALLS.values()) >= 2 * EXAMPLES, CALLS  # thousands, nearly all on the two POSTs
