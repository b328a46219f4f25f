"""Per-request samplers over HTTP: fields, defaults, errors, and a chain a client reproduces offline
from GET /schedule's coefficient table alone."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ddpm.grid import image_pngs
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import sample_noise, seeds_to_tensor
from tests.app_client import app_client, metric, wait_ready


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.parametrize(
    "fields",
    [
        {"sampler": "ddim", "steps": 15, "eta": 0.3},
        {"sampler": "dpmsolver++", "steps": 8, "timestep_spacing": "trailing"},
        {"sampler": "ddpm", "steps": 20, "timestep_spacing": "leading", "clip_denoised": False},
    ],
    ids=lambda f: f["sampler"],
)
def test_each_sampler_gives_the_offline_images(client: TestClient, model_dir: Path, fields: dict) -> None:
    r = client.post("/generate", json={"seed": 4, "batch_size": 2, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sampler"] == fields["sampler"] and body["steps"] == fields["steps"]
    assert body["eta"] == fields.get("eta", 0.0)
    assert body["timestep_spacing"] == fields.get("timestep_spacing", "trailing")  # the server's default
    model = load_model_source(model_dir)
    with torch.inference_mode():
        offline = sample(model.eps_model, model.schedule, seeds_to_tensor(image_seeds(4, 2)), model.image_shape, steps=fields["steps"],
                         sampler=fields["sampler"], eta=fields.get("eta", 0.0), spacing=fields.get("timestep_spacing", "trailing"),
                         clip_denoised=fields.get("clip_denoised", True))  # fmt: skip
    expected = [np.asarray(Image.open(io.BytesIO(png))) for png in image_pngs(offline)]
    for got, want in zip(body["images"], expected, strict=True):
        assert np.abs(_pixels(got).astype(int) - want.astype(int)).max() <= 1  # 8-bit rounding of float-rounding noise


def test_image_steps_are_counted_by_sampler(client: TestClient) -> None:
    name = 'ddpm_image_steps_total{sampler="%s"}'
    before = {s: metric(client, name % s) for s in ("ddim", "sde-dpmsolver++")}
    assert client.post("/generate", json={"seed": 3, "batch_size": 2, "sampler": "ddim", "steps": 15}).status_code == 200
    assert client.post("/generate", json={"seed": 3, "sampler": "sde-dpmsolver++", "steps": 4}).status_code == 200
    assert metric(client, name % "ddim") - before["ddim"] == 30
    assert metric(client, name % "sde-dpmsolver++") - before["sde-dpmsolver++"] == 4


@pytest.mark.parametrize(
    ("query", "timesteps", "counters"),
    [
        ({"sampler": "dpmsolver++", "steps": 6, "timestep_spacing": "trailing"}, [199, 166, 132, 99, 66, 32], [200, 167, 133, 100, 67, 33]),
        # restart (ddpm/samplers/restart.py): back up two positions after the third call; calls count their own noise counters
        ({"sampler": "restart", "steps": 6, "timestep_spacing": "trailing"}, [199, 149, 99, 149, 99, 49], [206, 205, 204, 203, 202, 201]),
    ],
    ids=["dpmsolver++", "restart"],
)
def test_the_schedule_table_reproduces_a_chain_offline(
    client: TestClient, model_dir: Path, query: dict, timesteps: list[int], counters: list[int]
) -> None:
    """A client with the U-Net, the Philox twin and GET /schedule's table alone gets the server's image."""
    table = client.get("/schedule", params=query).json()["chain"]
    assert table["timesteps"] == timesteps and table["noise_counter"] == counters
    assert table["steps"] == 6 and table["clip_denoised"] is True
    jumps = (table["jump_x"], table["jump_z"]) if query["sampler"] == "restart" else ([1.0] * 6, [0.0] * 6)
    if query["sampler"] == "restart":
        assert jumps[0][2] < 1 and jumps[1][2] > 0 and jumps[0].count(1.0) == 5
    else:
        assert table["jump_x"] is None and table["jump_z"] is None
    c = {k: torch.tensor(v) for k, v in table["coefficients"].items()}
    model = load_model_source(model_dir)
    seeds = seeds_to_tensor(image_seeds(9, 1))
    x = sample_noise(seeds, 0, model.image_shape)
    x0_prev = torch.zeros_like(x)
    with torch.inference_mode():
        for j, t in enumerate(table["timesteps"]):
            eps = model.eps_model(x, torch.tensor([t]))
            x0 = c["x0_from_x"][j] * x - c["x0_from_eps"][j] * eps
            x0 = x0.clamp(-1, 1) if c["clip"][j] > 0 else x0
            z = sample_noise(seeds, table["noise_counter"][j], model.image_shape)
            mean = c["x"][j] * x + c["eps"][j] * eps + c["x0"][j] * x0 + c["x0_prev"][j] * x0_prev
            ux, uz = jumps[0][j], jumps[1][j]  # the forward jump folded into the step (1, 0: none)
            x = ux * mean + ((ux * c["sigma"][j]) ** 2 + uz**2) ** 0.5 * z
            x0_prev = x0
    served = client.post("/generate", json={"seed": 9, **query}).json()["images"][0]
    mine = np.asarray(Image.open(io.BytesIO(image_pngs(x)[0])))
    assert np.abs(_pixels(served).astype(int) - mine.astype(int)).max() <= 1


def test_schedule_without_a_chain_query_has_no_table(client: TestClient) -> None:
    assert client.get("/schedule").json()["chain"] is None
    ddpm = client.get("/schedule", params={"sampler": "ddpm"}).json()["chain"]  # the paper's chain, as the server runs it
    assert ddpm["sampler"] == "ddpm" and ddpm["timesteps"] == list(range(199, -1, -1)) and ddpm["coefficients"]["sigma"][-1] == 0
    default = client.get("/schedule", params={"steps": 10}).json()["chain"]
    assert (default["sampler"], default["timestep_spacing"], default["timesteps"][0]) == ("restart", "trailing", 199)


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("step=5", "query.step: not a parameter of this route (it takes clip_denoised, eta, sampler, steps, timestep_spacing)"),
        ("steps=5&steps=6", "query.steps: appears more than once in the query string"),
        ("_=1700000000&sampler=ddim", "query._: not a parameter of this route"),
    ],
)
def test_a_query_parameter_the_schedule_does_not_take_or_given_twice_is_422(client: TestClient, query: str, said: str) -> None:
    """As an unknown or duplicate JSON field is: ``?step=5`` answered the schedule without a chain, and ``?steps=5&steps=6``
    the last one, silently."""
    r = client.get(f"/schedule?{query}")
    assert r.status_code == 422 and r.json()["detail"].startswith(said), r.text


def test_null_is_the_default_for_every_field_that_has_one(client: TestClient) -> None:
    """``batch_size``, ``first_image`` and /v1's ``n`` were 422 for null, every optional field took it as its default:
    OpenAI's spec makes ``n`` nullable, and generated clients send null for what the caller left out."""
    plain = client.post("/generate", json={"seed": 3, "steps": 2}).json()
    nulls = client.post("/generate", json={"seed": 3, "steps": 2, "batch_size": None, "first_image": None}).json()
    assert (nulls["batch_size"], nulls["first_image"], nulls["images"]) == (1, 0, plain["images"])
    openai = client.post("/v1/images/generations", json={"prompt": "x", "n": None, "seed": 3, "steps": 2})
    assert openai.status_code == 200 and len(openai.json()["data"]) == 1, openai.text
    assert client.post("/generate", json={"seed": None}).status_code == 422  # no default: still required
    # and the contract says so (a schema-driven fuzzer found "first_image": null answered 200 against an integer schema)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model, field in (("GenerateRequest", "batch_size"), ("GenerateRequest", "first_image"), ("ImageGenerationRequest", "n")):
        prop = schemas[model]["properties"][field]
        assert {"type": "null"} in prop["anyOf"] and prop["default"] in (0, 1), (model, field, prop)
    assert "null" not in str(schemas["GenerateRequest"]["properties"]["seed"])


@pytest.mark.parametrize("path", ["/generate", "/generate/stream"])
def test_a_query_string_on_generate_is_422_not_ignored(client: TestClient, path: str) -> None:
    """``POST /generate?batch_size=4`` with a body of one image answered one image: the query string was ignored."""
    r = client.post(f"{path}?batch_size=4", json={"seed": 1, "steps": 2})
    assert r.status_code == 422 and r.json()["detail"].startswith("query.batch_size: not a parameter of this route (it takes none)"), r.text
    assert client.post(path, json={"seed": 1, "steps": 2}).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"sampler": "ddpm", "eta": 0.5}, "eta"),
        ({"sampler": "dpmsolver++", "eta": 0.0}, "eta"),
        ({"eta": 0.5}, "eta"),  # the default sampler is restart
        ({"sampler": "ddim", "eta": 1.5}, "eta"),
        ({"sampler": "ddim", "eta": "0.5"}, "eta"),
        ({"sampler": "euler"}, "sampler"),
        ({"timestep_spacing": "random"}, "timestep_spacing"),
        ({"sampler": "ddim", "steps": 201}, "steps"),
    ],
)
def test_bad_sampler_fields_are_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/generate", json={"seed": 1, **body})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]
    if not isinstance(body.get("eta"), str):  # a query string has no types: "0.5" is a number there
        q = client.get("/schedule", params=body)
        assert q.status_code == 422 and field in q.json()["detail"]


def test_server_defaults(model_dir: Path) -> None:
    with app_client(model_dir, default_sampler="dpmsolver++", default_steps=7, default_timestep_spacing="trailing") as c:
        wait_ready(c)
        body = c.post("/generate", json={"seed": 2}).json()
        assert (body["sampler"], body["steps"], body["timestep_spacing"]) == ("dpmsolver++", 7, "trailing")
        full = c.post("/generate", json={"seed": 2, "sampler": "ddpm", "steps": 200}).json()  # the paper's chain: one field away
        assert (full["sampler"], full["steps"]) == ("ddpm", 200)
    with app_client(model_dir, default_steps=5000) as c:  # more than this model's T: T
        wait_ready(c)
        assert c.post("/generate", json={"seed": 2}).json()["steps"] == 200
