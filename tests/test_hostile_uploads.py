"""Round four of the hostile review (RELIABILITY.md), over HTTP: tiny hostile uploads are the client's
error on every route, multipart bodies that are cut short or repeat a part are refused, /v1 errors are
typed as OpenAI types them, and /generate takes what a browser gives (a data: URL, base64 in lines)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app_client import metric
from tests.test_image_inputs import npy_declaring, png_declaring, png_with_split_idat

SHAPE = (1, 8, 8)  # the tiny model's (conftest.model_dir)
HOSTILE = {
    "bomb": png_declaring(20000, 20000),
    "broken": png_with_split_idat(SHAPE),
    "npy": npy_declaring((100000, 100000)),
}


def _png(pixels: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


DIGIT = _png((np.arange(64, dtype=np.uint8) * 4).reshape(8, 8), "L")
ALPHA = np.full((8, 8), 255, np.uint8)
ALPHA[4:] = 0
MASK = _png(np.dstack([np.zeros((8, 8), np.uint8), ALPHA]), "LA")


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("field", ["image", "mask"])
@pytest.mark.parametrize("route", ["/generate", "/generate/stream"])
def test_hostile_inputs_are_422_naming_the_field_on_generate(client: TestClient, name: str, field: str, route: str) -> None:
    errors = metric(client, 'ddpm_requests_total{code="500"}')
    inputs = {"image": DIGIT, "mask": MASK, field: HOSTILE[name]}
    body = {"seed": 1, "steps": 2, "sampler": "ddim", **{k: base64.b64encode(v).decode() for k, v in inputs.items()}}
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}:") and "Traceback" not in r.text
    assert metric(client, 'ddpm_requests_total{code="500"}') == errors


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize(
    ("route", "field"), [("/v1/images/edits", "image"), ("/v1/images/edits", "mask"), ("/v1/images/variations", "image")]
)
def test_hostile_uploads_are_400_naming_the_parameter_on_openai_routes(client: TestClient, name: str, route: str, field: str) -> None:
    files = {"image": ("in.png", DIGIT, "image/png"), **({"mask": ("m.png", MASK, "image/png")} if route.endswith("edits") else {})}
    files[field] = ("x.png", HOSTILE[name], "image/png")
    data = {"prompt": "a digit", "steps": "2"} if route.endswith("edits") else {"steps": "2"}
    r = client.post(route, files=files, data=data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["type"]) == (field, "invalid_request_error")


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary", close: bool = True) -> tuple[bytes, dict[str, str]]:
    body = b""
    for name, value in parts:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'.encode()
        body += b"Content-Type: image/png\r\n\r\n" + value + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_an_image_part_sent_twice_is_400(client: TestClient) -> None:
    body, headers = _multipart([("image", DIGIT), ("image", DIGIT)])
    r = client.post("/v1/images/variations", content=body, headers=headers)
    assert r.status_code == 400 and "'image' is sent more than once" in r.json()["error"]["message"]


def test_a_multipart_body_without_its_closing_boundary_is_400(client: TestClient) -> None:
    body, headers = _multipart([("image", DIGIT)], close=False)
    r = client.post("/v1/images/variations", content=body, headers=headers)
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"]
    body, headers = _multipart([("image", DIGIT)])
    assert client.post("/v1/images/variations", content=body, headers=headers).status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), [("DELETE", "/v1/images/generations", 405), ("GET", "/v1/nothing", 404)])
def test_openai_errors_are_typed_by_status(client: TestClient, method: str, path: str, status: int) -> None:
    r = client.request(method, path)
    assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"


def test_generate_takes_a_data_url_and_base64_in_lines(client: TestClient) -> None:
    plain = base64.b64encode(DIGIT).decode()
    wrapped = "\r\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))  # MIME's 76-character lines
    answers = []
    for image in (plain, "data:image/png;base64," + plain, wrapped):
        r = client.post("/generate", json={"seed": 3, "steps": 2, "sampler": "ddim", "image": image, "strength": 0.5})
        assert r.status_code == 200, r.text
        answers.append((r.json()["input_sha256"], r.json()["images"]))
    assert answers[0] == answers[1] == answers[2]
    r = client.post("/generate", json={"seed": 3, "steps": 2, "image": "data:image/png," + plain})  # not base64
    assert r.status_code == 422 and r.json()["detail"].startswith("image:")


def test_an_input_over_the_models_bound_is_refused_undecoded(client: TestClient) -> None:
    limits = client.get("/info").json()["limits"]
    assert limits["max_body_bytes"] >= 2 * 4 * limits["max_input_bytes"] // 3  # the largest image and mask fit in a body
    big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * (limits["max_input_bytes"] + 1)).decode()
    r = client.post("/generate", json={"seed": 1, "image": big})
    assert r.status_code == 422 and f"at most {limits['max_input_bytes']} bytes" in r.json()["detail"]
