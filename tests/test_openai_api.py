"""POST /v1/images/generations and GET /v1/models, driven by the official ``openai`` package (PyPI)
against a real server process: the answers parse as its types, and its error classes come out of
our 401/404/400/422/429/503."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.app_client import app_client, metric, wait_ready
from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model

openai = pytest.importorskip("openai")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=50)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(model_dir, DDPM_API_TOKEN=TOKEN, DDPM_MAX_IMAGES_PER_CLIENT="6", DDPM_MAX_IMAGES_PER_REQUEST="8")
    s.wait_ready()
    yield s
    s.stop()


def _client(server: ServerProcess, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_images_generate_with_the_openai_client(server: ServerProcess) -> None:
    client = _client(server)
    chain = {"seed": 11, "steps": 6, "sampler": "ddim"}
    result = client.images.generate(prompt="a handwritten seven", model="tiny", n=3, size="8x8", response_format="b64_json",
                                     user="end-user-42", extra_body=chain)  # fmt: skip
    assert isinstance(result, openai.types.ImagesResponse) and len(result.data) == 3
    assert abs(result.created - time.time()) < 120
    extra = result.model_extra or {}
    assert extra["seed"] == 11 and extra["steps"] == 6 and extra["sampler"] == "ddim" and extra["model"] == "tiny"
    # the same engine as /generate: the same PNGs for the same seed and chain
    same = httpx.post(server.url + "/generate", json={**chain, "batch_size": 3}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert [d.b64_json for d in result.data] == same.json()["images"]
    assert _pixels(result.data[0].b64_json).shape == (8, 8)
    # the prompt does not condition this model; the user is logged
    other = client.images.generate(prompt="something else entirely", n=3, extra_body=chain)
    assert [d.b64_json for d in other.data] == [d.b64_json for d in result.data]
    server.wait_output(lambda out: '"user": "end-user-42"' in out)  # the access line comes after the answer
    # OpenAI's safety_identifier, which deprecates user (a 422 "Extra inputs are not permitted" before): logged as the user,
    # before user where both are given
    client.images.generate(prompt="x", safety_identifier="hashed-9f2", user="end-user-42", extra_body={"steps": 2})
    server.wait_output(lambda out: '"user": "hashed-9f2"' in out)  # the access line comes after the answer
    # no seed: a random one, returned
    drawn = client.images.generate(prompt="x", extra_body={"steps": 2})
    assert isinstance((drawn.model_extra or {})["seed"], int) and len(drawn.data) == 1
    assert server.metric('ddpm_requests_total{code="200"}') >= 3
    assert server.metric('ddpm_http_responses_total{route="/v1/images/generations",code="200"}') == 4


def test_models_list_and_retrieve(server: ServerProcess) -> None:
    client = _client(server)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "ddpm-serve"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("dall-e-3")


def test_error_classes(server: ServerProcess) -> None:
    client = _client(server)
    with pytest.raises(openai.AuthenticationError) as auth:
        _client(server, "wrong").images.generate(prompt="x")
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.images.generate(prompt="x", n=0)
    assert invalid.value.param == "n" and "greater than or equal to 1" in invalid.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="n must be <= 8"):
        client.images.generate(prompt="x", n=9)
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        client.images.generate(prompt="x", extra_body={"sampler": "euler"})
    assert unknown.value.param == "sampler"
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", size="1024x1024")
    assert size.value.param == "size" and "'8x8'" in size.value.message
    with pytest.raises(openai.BadRequestError, match="url' is not supported"):
        client.images.generate(prompt="x", response_format="url")
    # OpenAI's other options: harmless values are accepted, what this model cannot do names its param
    accepted = client.images.generate(prompt="x", quality="standard", output_format="png", background="opaque", moderation="low",
                                      extra_body={"steps": 2})  # fmt: skip
    assert len(accepted.data) == 1
    auto = client.images.generate(prompt="x", size="auto", extra_body={"steps": 2})  # gpt-image-1's default: was a 400
    assert auto.size == "8x8" and len(auto.data) == 1
    for option, value in (("quality", "hd"), ("style", "vivid"), ("output_format", "gif"), ("background", "transparent"),
                          ("output_compression", 50), ("complexity", "high")):  # fmt: skip  # (a compression of png, which is lossless)
        with pytest.raises(openai.BadRequestError) as unsupported:
            client.images.generate(prompt="x", **{option: value})  # type: ignore[arg-type]
        assert unsupported.value.param == option and unsupported.value.code == "unsupported_value", option
    with pytest.raises(openai.NotFoundError, match="model 'dall-e-2' is not served") as not_found:
        client.images.generate(prompt="x", model="dall-e-2")
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as never:  # 7 images > DDPM_MAX_IMAGES_PER_CLIENT = 6: never (429 before)
        client.images.generate(prompt="x", n=7)
    assert never.value.param == "n" and "a client may have in flight at most 6 (DDPM_MAX_IMAGES_PER_CLIENT)" in never.value.message
    # a 429: this client's images in flight (5 of a long inpainting: RePaint's resampling, ~900 U-Net calls) and 2 more
    gray, black = io.BytesIO(), io.BytesIO()
    Image.new("L", (8, 8), 128).save(gray, format="PNG")
    Image.new("L", (8, 8), 0).save(black, format="PNG")  # black without alpha: repaint every pixel
    image, mask = (base64.b64encode(b.getvalue()).decode() for b in (gray, black))
    long = {"seed": 1, "batch_size": 5, "image": image, "mask": mask, "steps": 50, "jump_length": 5, "jump_n_sample": 20}
    held = threading.Thread(target=lambda: httpx.post(server.url + "/generate", json=long, headers={"Authorization": f"Bearer {TOKEN}"},
                                                      timeout=120))  # fmt: skip
    held.start()
    server.wait_metric("ddpm_running_samples", lambda v: v == 5)
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(prompt="x", n=2)
    held.join(60)
    assert limited.value.response.headers["retry-after"] == "5" and limited.value.code == "rate_limit_exceeded"
    assert server.metric('ddpm_requests_total{code="429"}') == 1


def test_503_is_the_clients_internal_server_error_and_is_retried(model_dir: Path) -> None:
    """A draining server: every request is 503 + Retry-After; the client's own retry honours it."""
    with app_client(model_dir, retry_after_s=1) as c:
        wait_ready(c)
        c.app.state.server.drain()  # type: ignore[attr-defined]
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.images.generate(prompt="x")
        assert unavailable.value.status_code == 503 and unavailable.value.code == "service_unavailable"
        assert "draining" in unavailable.value.message
        retrying = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=1)
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError):
            retrying.images.generate(prompt="x")
        assert time.monotonic() - start >= 0.9  # waited the server's Retry-After: 1 once
        assert metric(c, 'ddpm_requests_total{code="503"}') == 3  # one, then one plus its retry


def _png_file(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


DIGIT = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
HOLE = np.full((8, 8), 255, dtype=np.uint8)
HOLE[2:6, 2:6] = 0  # a centre square to repaint (alpha 0)


def test_images_edit_and_variation_with_the_openai_client(server: ServerProcess) -> None:
    client = _client(server)
    mask = _png_file(np.stack([np.zeros((8, 8), np.uint8), HOLE], axis=-1), "LA")
    chain = {"seed": 3, "steps": 5, "sampler": "ddim"}
    edited = client.images.edit(image=("digit.png", _png_file(DIGIT), "image/png"), mask=("mask.png", mask, "image/png"),
                                prompt="fill the hole", n=2, size="8x8", extra_body=chain)  # fmt: skip
    assert isinstance(edited, openai.types.ImagesResponse) and len(edited.data) == 2
    extra = edited.model_extra or {}
    assert extra["strength"] == 1.0 and extra["jump_length"] == 5 and extra["jump_n_sample"] == 2 and len(extra["input_sha256"]) == 64
    for d in edited.data:
        out = _pixels(d.b64_json)
        assert np.array_equal(out[HOLE > 0], DIGIT[HOLE > 0])  # every pixel outside the hole, exactly
    # no mask: the image's own transparency marks the hole (OpenAI's rule); the same pixels, the same answer
    with_alpha = _png_file(np.stack([DIGIT, HOLE], axis=-1), "LA")
    same = client.images.edit(image=("digit.png", with_alpha, "image/png"), prompt="fill the hole", n=2, extra_body=chain,
                              safety_identifier="hashed-e1")  # fmt: skip
    assert [d.b64_json for d in same.data] == [d.b64_json for d in edited.data]
    server.wait_output(lambda out: '"user": "hashed-e1"' in out)  # the access line comes after the answer
    # variations: SDEdit at strength 0.4 by default, and the same as /generate with the same image
    varied = client.images.create_variation(image=("digit.png", _png_file(DIGIT), "image/png"), n=2, extra_body=chain)
    assert (varied.model_extra or {})["strength"] == 0.4
    body = {**chain, "batch_size": 2, "image": base64.b64encode(_png_file(DIGIT)).decode()}
    direct = httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert [d.b64_json for d in varied.data] == direct.json()["images"]
    assert server.metric('ddpm_http_responses_total{route="/v1/images/edits",code="200"}') == 2


def test_streamed_images_with_partial_images_through_the_openai_client(server: ServerProcess) -> None:
    """``stream=True, partial_images=2`` (a 422 before): two previews of each image while its chain runs, in order,
    then each image, the same PNGs as the answer without streaming; an image already made (the response cache) comes
    without previews; an edit streams as image_edit events, its known pixels kept in the previews too."""
    client = _client(server)
    chain = {"seed": 101, "steps": 9, "sampler": "ddim"}
    events = list(client.images.generate(prompt="x", n=2, stream=True, partial_images=2, extra_body=chain))
    kinds = [(e.type, getattr(e, "partial_image_index", None), (e.model_extra or {})["image_index"]) for e in events]
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert sorted(kinds[:4], key=lambda kind: (kind[2], kind[1])) == [(partial, 0, 0), (partial, 1, 0), (partial, 0, 1), (partial, 1, 1)]
    assert kinds[4:] == [(completed, None, 0), (completed, None, 1)]
    assert all(_pixels(e.b64_json).shape == (8, 8) for e in events) and events[4].size == "8x8"
    assert events[4].usage.total_tokens == 0 and (events[4].model_extra or {})["seed"] == 101
    whole = client.images.generate(prompt="x", n=2, extra_body=chain)  # (from the cache, which the stream filled)
    assert [d.b64_json for d in whole.data] == [e.b64_json for e in events[4:]]
    again = list(client.images.generate(prompt="x", n=2, stream=True, partial_images=2, extra_body=chain))
    assert [e.type for e in again] == [completed, completed] and [e.b64_json for e in again] == [e.b64_json for e in events[4:]]
    mask = _png_file(np.stack([np.zeros((8, 8), np.uint8), HOLE], axis=-1), "LA")
    edited = list(client.images.edit(image=("digit.png", _png_file(DIGIT), "image/png"), mask=("mask.png", mask, "image/png"),
                                     prompt="fill", stream=True, partial_images=1, extra_body={**chain, "seed": 102}))  # fmt: skip
    assert [e.type for e in edited] == ["image_edit.partial_image", "image_edit.completed"]
    for e in edited:
        assert np.array_equal(_pixels(e.b64_json)[HOLE > 0], DIGIT[HOLE > 0])
    with pytest.raises(openai.UnprocessableEntityError, match="partial_images"):
        client.images.generate(prompt="x", stream=True, partial_images=4)
    assert server.metric('ddpm_http_responses_total{route="/v1/images/edits",code="200"}') >= 1


def test_jpeg_and_webp_answers_as_output_format_asks(server: ServerProcess) -> None:
    """``output_format`` jpeg or webp (a 400 before), ``output_compression`` their quality: files of that format with
    the PNG's pixels (JPEG within its loss), their own ETags; a streamed answer's events alike."""
    client = _client(server)
    chain = {"seed": 301, "steps": 4, "sampler": "ddim"}
    png = client.images.generate(prompt="x", n=2, extra_body=chain)
    for fmt, compression, loss in (("jpeg", None, 8), ("webp", 100, 8), ("jpeg", 10, 255)):  # (quality 10: any pixels)
        answer = client.images.generate(prompt="x", n=2, output_format=fmt, extra_body=chain,  # type: ignore[arg-type]
                                        **({} if compression is None else {"output_compression": compression}))  # fmt: skip
        assert answer.output_format == fmt
        for ours, lossless in zip(answer.data, png.data, strict=True):
            file = Image.open(io.BytesIO(base64.b64decode(ours.b64_json)))
            assert file.format == fmt.upper() and file.size == (8, 8)
            assert np.abs(np.asarray(file.convert("L"), int) - _pixels(lossless.b64_json)).max() <= loss, (fmt, compression)
    quality_10, quality_100 = (len(client.images.generate(prompt="x", output_format="jpeg", output_compression=q, extra_body=chain)
                                   .data[0].b64_json) for q in (10, 100))  # fmt: skip
    assert quality_10 < quality_100
    auth = {"Authorization": f"Bearer {TOKEN}"}
    etags = {fmt: httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", **chain, "output_format": fmt}, headers=auth,
                             timeout=60).headers["etag"] for fmt in ("png", "jpeg", "webp")}  # fmt: skip
    assert len(set(etags.values())) == 3
    streamed = list(client.images.generate(prompt="x", stream=True, partial_images=1, output_format="webp",
                                           extra_body={**chain, "seed": 302}))
    assert [e.output_format for e in streamed] == ["webp", "webp"]
    assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == "WEBP" for e in streamed)


def test_a_stream_that_fails_ends_in_an_error_event_the_openai_client_raises(model_dir: Path) -> None:
    """A streamed request past its deadline (504 after the stream's 200): an ``error`` event in OpenAI's shape, which
    the client raises as APIError; the outcome is the 504's in the metrics."""
    from service.engine.iteration_cost import IterationCost
    from tests.app_client import app_and_state

    c, state = app_and_state(model_dir, request_timeout_s=0.05)
    with c:
        wait_ready(c)
        assert state.engine is not None
        state.engine.cost = IterationCost()  # nothing measured: not refused up front as outlasting its timeout
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0)
        with pytest.raises(openai.APIError, match="deadline"):
            list(client.images.generate(prompt="x", n=32, stream=True, partial_images=1, extra_body={"seed": 1, "steps": 49}))
        assert metric(c, 'ddpm_requests_total{code="504"}') == 1


def test_edit_errors_are_openai_errors(server: ServerProcess) -> None:
    client = _client(server)
    rgb = ("big.png", _png_file(np.zeros((64, 64, 3), np.uint8)), "image/png")
    with pytest.raises(openai.BadRequestError, match="this model takes 8x8 grey PNGs") as caught:
        client.images.create_variation(image=rgb)
    assert caught.value.body["param"] == "image"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="transparent pixels"):
        client.images.edit(image=("digit.png", _png_file(DIGIT), "image/png"), prompt="x")  # no mask, no alpha
    with pytest.raises(openai.BadRequestError, match="not a PNG"):
        client.images.create_variation(image=("x.gif", b"GIF89a....", "image/gif"))
    with pytest.raises(openai.UnprocessableEntityError, match="strength"):
        client.images.create_variation(image=("digit.png", _png_file(DIGIT), "image/png"), extra_body={"strength": 2})
    two = [("image[]", ("a.png", _png_file(DIGIT), "image/png")), ("image[]", ("b.png", _png_file(DIGIT), "image/png"))]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(server.url + "/v1/images/edits", data={"prompt": "x"}, files=two, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image" and "one input image" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/images/variations", json={"n": 1}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
