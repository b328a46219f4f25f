"""service.client (sync and async) and ``ddpm generate`` against a real server process; the retry
policy (503 / 429 after Retry-After) against scripted answers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service import client as client_module
from service.client import AsyncClient, Client, ClientError, ServerError
from tests.command_in_process import WITHOUT_TORCH
from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model

TOKEN = "client-token"
CHAIN = {"steps": 8, "sampler": "dpmsolver++"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=100)
    # settings as flags: they win over the environment (DDPM_MAX_BATCH=8 from ServerProcess)
    s = ServerProcess(model, args=["--max-batch", "3", "--max-queue", "77", "--response-cache-mb", "0"], DDPM_API_TOKEN=TOKEN,
                      DDPM_MAX_QUEUE="5")  # fmt: skip
    s.wait_ready()
    yield s
    s.stop()


def _direct(server: ServerProcess, body: dict, accept: str = "application/json") -> httpx.Response:
    return httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept}, timeout=60)


def test_serve_flags_win_over_the_environment(server: ServerProcess) -> None:
    limits = httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["limits"]
    assert limits["max_batch"] == 3 and limits["max_queue"] == 77


def test_sync_client(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPM_API_TOKEN", TOKEN)  # the token from the environment
    expected = _direct(server, {"seed": 3, "batch_size": 4, **CHAIN}).json()
    events: list[tuple[str, dict]] = []
    with Client(server.url) as client:
        plain = client.generate(3, 4, **CHAIN)
        streamed = client.generate(3, 4, on_event=lambda name, data: events.append((name, data)), **CHAIN)
        assert client.info()["model"]["name"] == "tiny"
    assert plain.pngs == [base64.b64decode(i) for i in expected["images"]]
    assert streamed.pngs == plain.pngs and streamed.meta["sampler"] == "dpmsolver++" and streamed.meta["steps"] == 8
    assert events[0][0] == "queued" and events[-1] == ("progress", events[-1][1]) and events[-1][1]["total"] == 32
    assert plain.array().shape == (4, 1, 8, 8) and plain.array().dtype == np.float32
    with Client(server.url, token="wrong") as client, pytest.raises(ServerError) as denied:
        client.generate(0, 1)
    assert denied.value.status == 401
    with Client(server.url) as client, pytest.raises(ServerError, match=r"steps must be in 1\.\.100"):
        client.generate(0, 1, steps=101)


def test_a_larger_set_is_asked_for_in_parts_and_is_the_same_images(server: ServerProcess) -> None:
    """``per_request`` (the server's max_images_per_request, which ``ddpm generate`` reads from /info): 5 images in
    parts of 2 are images 0..4 of the seed, up to the U-Net's batched rounding, and each part is the server's answer
    for its first_image exactly; progress counts the whole."""
    whole = _direct(server, {"seed": 9, "batch_size": 5, **CHAIN}).json()
    events: list[tuple[str, dict]] = []
    with Client(server.url, token=TOKEN) as client:
        parts = client.generate(9, 5, per_request=2, on_event=lambda name, data: events.append((name, data)), **CHAIN)
    assert len(parts.pngs) == 5 and parts.meta["batch_size"] == 5 and parts.meta["requests"] == 3 and parts.meta["first_image"] == 0
    direct = [_direct(server, {"seed": 9, "batch_size": min(2, 5 - k), "first_image": k, **CHAIN}).json() for k in (0, 2, 4)]
    assert parts.pngs == [base64.b64decode(png) for answer in direct for png in answer["images"]]
    wanted = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in whole["images"]])[:, None] / 255.0
    assert np.abs(parts.array() - wanted).max() <= 1 / 255 + 1e-6  # README "Reproducibility": at most 1 PNG level
    progress = [data for name, data in events if name == "progress"]
    assert {p["total"] for p in progress} == {40} and 16 < progress[-1]["steps_done"] <= 40  # 5 images x 8 calls; a part's is 16
    assert [p["steps_done"] for p in progress] == sorted(p["steps_done"] for p in progress)


def test_ddpm_generate_asks_for_more_than_a_request_holds_in_parts(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny", num_timesteps=100)
    s = ServerProcess(model, DDPM_MAX_IMAGES_PER_REQUEST="8", DDPM_MAX_IMAGES_PER_CLIENT="4", DDPM_COMPILE="off")  # 4 a request: the quota
    try:
        s.wait_ready()
        cmd = [sys.executable, "-m", "commands.main", "generate", "--url", s.url, "--seed", "7", "-n", "6", "--first-image", "2",
               "--steps", "8", "--sampler", "dpmsolver++", "-o", str(tmp_path / "x.npy")]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "DDPM_API_TOKEN": ""})
        assert done.returncode == 0, done.stderr
        assert {k: json.loads(done.stdout)[k] for k in ("batch_size", "first_image")} == {"batch_size": 6, "first_image": 2}
        assert "48/48" in done.stderr  # one bar over both parts: 6 images x 8 calls
        parts = [httpx.post(s.url + "/generate", json={"seed": 7, "batch_size": n, "first_image": k, **CHAIN}, timeout=60).json()
                 for k, n in ((2, 4), (6, 2))]  # fmt: skip
        served = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for p in parts for png in p["images"]])
        assert np.array_equal(np.round(np.load(tmp_path / "x.npy")[:, 0] * 255), served)
        too_many = httpx.post(s.url + "/generate", json={"seed": 7, "batch_size": 6}, timeout=60)
        assert too_many.status_code == 422  # what the command used to get
    finally:
        s.stop()


def test_ddpm_generate_resize_fits_a_photo_to_the_served_model(server: ServerProcess, tmp_path: Path) -> None:
    """A 40x30 colour photo as --init-image of an 8x8 grey model: refused by the server (it bounds an upload by the
    model's size); with --resize the command sends its middle 30x30, resampled and grey (ddpm/input_fit.py), as the
    web page's editor does, and the images are those of that PNG sent as it is."""
    from ddpm.input_fit import fitted_png

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photo)
    env = {**os.environ, "DDPM_API_TOKEN": TOKEN}
    cmd = [sys.executable, "-c", WITHOUT_TORCH, "generate", "--url", server.url, "--seed", "3", "-n", "2", "--steps", "8",
           "--sampler", "dpmsolver++", "--init-image", str(photo), "--quiet"]  # fmt: skip
    refused = subprocess.run([*cmd, "-o", str(tmp_path / "r.npy")], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "422" in refused.stderr and "40x30" in refused.stderr
    fitted = subprocess.run([*cmd, "--resize", "-o", str(tmp_path / "f.npy")], env=env, capture_output=True, text=True, timeout=60)
    assert fitted.returncode == 0, fitted.stderr
    sent = fitted_png(photo.read_bytes(), (1, 8, 8))
    direct = _direct(server, {"seed": 3, "batch_size": 2, "image": base64.b64encode(sent).decode(), **CHAIN}, accept="application/x-npy")
    assert np.abs(np.load(tmp_path / "f.npy") - np.load(io.BytesIO(direct.content))).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG pixels
    alone = subprocess.run([*cmd[:4], "--resize", "-o", str(tmp_path / "a.png")], env=env, capture_output=True, text=True, timeout=60)
    assert alone.returncode != 0 and "--resize needs --init-image" in alone.stderr


def test_async_client(server: ServerProcess) -> None:
    expected = _direct(server, {"seed": 5, "batch_size": 2, **CHAIN}).json()

    async def run() -> tuple:
        events: list[str] = []
        async with AsyncClient(server.url, token=TOKEN) as client:
            plain, streamed = await asyncio.gather(
                client.generate(5, 2, **CHAIN), client.generate(5, 2, on_event=lambda name, _: events.append(name), **CHAIN)
            )
            return plain, streamed, events, await client.info()

    plain, streamed, events, info = asyncio.run(run())
    assert plain.pngs == streamed.pngs == [base64.b64decode(i) for i in expected["images"]]
    assert events[0] == "queued" and "progress" in events and info["limits"]["max_batch"] == 3


def test_ddpm_generate_writes_the_servers_images(server: ServerProcess, tmp_path: Path) -> None:
    env = {**os.environ, "DDPM_API_TOKEN": TOKEN}  # a client has no use for torch: 3.6 s to refuse a bad -o with it, 0.7 s now
    cmd = [sys.executable, "-c", WITHOUT_TORCH, "generate", "--url", server.url, "--seed", "7", "-n", "6", "--steps", "8",
           "--sampler", "dpmsolver++"]  # fmt: skip
    grid = subprocess.run([*cmd, "-o", str(tmp_path / "grid.png")], env=env, capture_output=True, text=True, timeout=120)
    assert grid.returncode == 0, grid.stderr
    assert "image-step" in grid.stderr and "100%" in grid.stderr  # the progress bar, filled
    assert json.loads(grid.stdout)["output"] == str(tmp_path / "grid.png") and json.loads(grid.stdout)["sampler"] == "dpmsolver++"
    served_grid = _direct(server, {"seed": 7, "batch_size": 6, **CHAIN}, accept="image/png").content
    assert (tmp_path / "grid.png").read_bytes() == served_grid  # the same grid, byte for byte
    arrays = subprocess.run([*cmd, "-o", str(tmp_path / "x.npy"), "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert arrays.returncode == 0 and arrays.stderr == ""
    served = np.load(io.BytesIO(_direct(server, {"seed": 7, "batch_size": 6, **CHAIN}, accept="application/x-npy").content))
    got = np.load(tmp_path / "x.npy")
    assert got.shape == served.shape == (6, 1, 8, 8) and np.abs(got - served).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG pixels
    # a bulk job's flags (issue 37's fields had none on the command line): sent, echoed, counted at that priority
    bulk = subprocess.run([*cmd, "-o", str(tmp_path / "b.npy"), "--quiet", "--priority", "5", "--deadline", "60"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bulk.returncode == 0, bulk.stderr
    assert {k: json.loads(bulk.stdout)[k] for k in ("priority", "deadline_s")} == {"priority": 5, "deadline_s": 60.0}
    assert 'ddpm_slo_requests_total{model="tiny",priority="5",result="met"}' in httpx.get(server.url + "/metrics").text
    bad = subprocess.run([*cmd, "--steps", "100000"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "422" in bad.stderr and "steps" in bad.stderr
    assert "100%" not in bad.stderr and "queued" in bad.stderr  # the bar of a refused request is not shown full
    # one retry of the refused connection (0.5 s), not the default five (15.5 s of backoff)
    unreachable = subprocess.run([*cmd[:4], "--url", "http://127.0.0.1:9", "--retries", "1", "-o", str(tmp_path / "y.png")],
                                 capture_output=True, text=True, timeout=60, env={**env, "DDPM_URL": ""})  # fmt: skip
    assert unreachable.returncode != 0 and "cannot reach http://127.0.0.1:9" in unreachable.stderr
    assert "no connection to http://127.0.0.1:9 (" in unreachable.stderr and "; retry 1 of 1 in 0.5 s" in unreachable.stderr  # not silent
    assert "100%" not in unreachable.stderr  # it showed "queued: 100% 16/16" before the error


def _scripted(answers: list[httpx.Response]) -> tuple[list[httpx.Request], object]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    return seen, handler


OK = {"seed": 0, "batch_size": 1, "images": [], "steps": 1}


def test_retries_honour_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_pause(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(client_module, "_pause", fake_pause)
    answers = [httpx.Response(503, headers={"Retry-After": "3"}, json={"detail": "queue full"}),
               httpx.Response(429, headers={"Retry-After": "1"}, json={"detail": "too many"}), httpx.Response(200, json=OK)]  # fmt: skip
    seen, handler = _scripted(answers)
    heard: list[tuple[str, int, float]] = []
    with Client("http://x", token="t", transport=httpx.MockTransport(handler), on_retry=lambda *a: heard.append(a)) as client:  # type: ignore[arg-type]
        assert client.generate(0, 1).meta["seed"] == 0
    assert slept == [3.0, 1.0] and len(seen) == 3 and seen[0].headers["authorization"] == "Bearer t"
    assert heard == [("503: queue full", 1, 3.0), ("429: too many", 2, 1.0)]  # told before each wait, with the server's reason
    # a stream whose error event is a 503 is retried too; then the retries run out
    sse_503 = 'event: queued\ndata: {}\n\nevent: error\ndata: {"status": 503, "detail": "draining"}\n\n'
    answers = [httpx.Response(200, text=sse_503, headers={"content-type": "text/event-stream"}) for _ in range(3)]
    seen, handler = _scripted(answers)
    with Client("http://x", max_retries=2, transport=httpx.MockTransport(handler)) as client, pytest.raises(ServerError) as gave_up:  # type: ignore[arg-type]
        client.generate(0, 1, on_event=lambda *_: None)
    assert gave_up.value.status == 503 and len(seen) == 3 and slept[2:] == [0.5, 1.0]


def test_a_load_balancers_502_is_retried_as_a_refused_connection_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind nginx, a replica restarting is a 502 (nginx's "no replica could be reached", or another proxy's HTML page),
    not a refused connection: ``ddpm generate`` gave up at once ("the server answered 502")."""
    slept: list[float] = []

    async def fake_pause(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(client_module, "_pause", fake_pause)
    answers = [httpx.Response(502, headers={"Retry-After": "2"}, json={"detail": "no replica could be reached"}),
               httpx.Response(502, text="<html><h1>502 Bad Gateway</h1></html>", headers={"content-type": "text/html"}),
               httpx.Response(200, json=OK)]  # fmt: skip
    seen, handler = _scripted(answers)
    with Client("http://x", transport=httpx.MockTransport(handler)) as client:  # type: ignore[arg-type]
        assert client.generate(0, 1).meta["seed"] == 0
    assert len(seen) == 3 and slept == [2.0, 1.0]  # its Retry-After, then the client's back-off


def test_async_retries_honour_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(client_module, "_pause", fake_sleep)
    answers = [httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "not ready"}), httpx.Response(200, json=OK)]
    seen, handler = _scripted(answers)

    async def run() -> dict:
        async with AsyncClient("http://x", transport=httpx.MockTransport(handler)) as client:  # type: ignore[arg-type]
            return (await client.generate(0, 1)).meta

    assert asyncio.run(run())["seed"] == 0 and slept == [2.0] and len(seen) == 2
    answers = [httpx.Response(400, json={"detail": "bad"})]
    seen, handler = _scripted(answers)

    async def bad() -> None:
        async with AsyncClient("http://x", transport=httpx.MockTransport(handler)) as client:  # type: ignore[arg-type]
            await client.generate(0, 1)

    with pytest.raises(ServerError, match="400: bad"):
        asyncio.run(bad())


def test_a_generation_saves_its_grid_in_the_format_its_name_says(tmp_path: Path) -> None:
    """``-o grid.jpg`` wrote PNG bytes under a .jpg name; a name Pillow has no writer for stays PNG (the library's
    callers; ``ddpm generate`` refuses such a name before it asks)."""
    from PIL import Image

    from ddpm.grid import png_bytes

    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    result = client_module.Generation([png_bytes(Image.fromarray(p)) for p in pixels])
    names = ("g.png", "g.jpg", "g.JPEG", "g.webp", "g", "g.psd")
    formats = {name: Image.open(result.save(tmp_path / name, ncols=2)).format for name in names}
    assert formats == {"g.png": "PNG", "g.jpg": "JPEG", "g.JPEG": "JPEG", "g.webp": "WEBP", "g": "PNG", "g.psd": "PNG"}
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (8, 14) and (grid[2:6, 2:6] == pixels[0]).all() and (grid[2:6, 8:12] == pixels[1]).all()


@pytest.mark.parametrize(("text", "sent"), [("tok\n", "tok"), ("old-token\nnew-token\n", "new-token"), ("\n  \n", None)])
def test_the_client_sends_the_last_token_of_a_token_file(text: str, sent: str | None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The server's token file holds old and new on two lines during a rotation (service/api/auth.py); a client reading
    the same file sent both, a header with a newline in it, which httpx refuses."""
    from service.client import _token

    (tmp_path / "token").write_text(text)
    monkeypatch.setenv("DDPM_API_TOKEN_FILE", str(tmp_path / "token"))
    assert _token(None) == sent and _token("given") == "given"


def test_a_token_file_the_client_cannot_read_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped DDPM_API_TOKEN_FILE, or one holding bytes that are not text, was a traceback from ``ddpm generate``
    (FileNotFoundError, UnicodeDecodeError), before any request; now the client's error, which the command says in a line."""
    from service.client import _token
    from tests.command_in_process import run_command

    (tmp_path / "binary").write_bytes(b"a\xffb\n")
    for name, said in (("missing", "No such file or directory"), ("binary", "can't decode byte 0xff")):
        monkeypatch.setenv("DDPM_API_TOKEN_FILE", str(tmp_path / name))
        with pytest.raises(ClientError, match=f"cannot read DDPM_API_TOKEN_FILE {tmp_path / name}: .*{said}"):
            _token(None)
        out = run_command(["generate", "--url", "http://127.0.0.1:9", "--retries", "0", "--quiet", "-o", str(tmp_path / "g.png")])
        assert out.code == 1 and "Traceback" not in out.stderr and f"cannot read DDPM_API_TOKEN_FILE {tmp_path / name}" in out.stderr
    (tmp_path / "token").write_text("tok\n")  # readable when the client starts, binary at its first 401: the 401 it got
    monkeypatch.setenv("DDPM_API_TOKEN_FILE", str(tmp_path / "token"))
    refused = httpx.MockTransport(lambda request: httpx.Response(401, json={"detail": "missing or invalid bearer token"}))
    client = Client("http://x", transport=refused)
    (tmp_path / "token").write_bytes(b"a\xffb\n")
    with pytest.raises(ServerError, match="401"):
        client.generate(0, 1)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_client_whose_token_file_was_rotated_sends_the_new_token_after_a_401(persistent: bool, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A batch job's client lives longer than its token: the Secret was rotated under it (the server follows its file,
    service/api/auth.py) and every later call was a 401. A client whose token came from DDPM_API_TOKEN_FILE reads it
    again after a 401 and, where it holds another token now, sends the request again with it (and keeps it); a token
    given as an argument, or a file that did not change, is a 401 at once, one request."""
    monkeypatch.setattr(client_module, "_pause", lambda seconds: asyncio.sleep(0))
    (tmp_path / "token").write_text("old-token\n")
    monkeypatch.setenv("DDPM_API_TOKEN_FILE", str(tmp_path / "token"))
    seen: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:  # rotated: only the new token is accepted
        seen.append(request.headers.get("authorization", ""))
        ok = request.headers.get("authorization") == "Bearer new-token"
        return httpx.Response(200, json=OK) if ok else httpx.Response(401, json={"detail": "missing or invalid bearer token"})

    async def calls(client: AsyncClient) -> None:
        async with client:
            assert (await client.generate(0, 1)).meta["seed"] == 0
            assert (await client.generate(0, 1)).meta["seed"] == 0

    def run(client: AsyncClient | Client) -> None:
        if isinstance(client, Client):
            client.generate(0, 1)
            client.generate(0, 1)
        else:
            asyncio.run(calls(client))

    def make(**kwargs: object) -> AsyncClient | Client:
        cls = AsyncClient if persistent else Client
        return cls("http://x", transport=httpx.MockTransport(server), **kwargs)  # type: ignore[arg-type]

    with pytest.raises(ServerError, match="401"):
        run(make())
    assert seen == ["Bearer old-token"]  # the file did not change: one request
    client = make()
    (tmp_path / "token").write_text("new-token\n")  # rotated while the client lives
    seen.clear()
    run(client)
    assert seen == ["Bearer old-token", "Bearer new-token", "Bearer new-token"]  # the second call sends the new one first
    seen.clear()
    with pytest.raises(ServerError, match="401"):
        run(make(token="old-token"))  # given: not the file's
    assert seen == ["Bearer old-token"]


def test_a_generation_saved_on_a_full_disk_keeps_the_file_there_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ddpm generate -o`` after the server's work: a full disk left a truncated file in place of the one there before."""
    import errno

    from PIL import Image

    from ddpm.grid import png_bytes

    result = client_module.Generation([png_bytes(Image.fromarray(np.zeros((4, 4), np.uint8)))])
    (tmp_path / "g.npy").write_bytes(b"before")

    def fills_up(f: Any, *args: object, **kwargs: object) -> None:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", fills_up)
    with pytest.raises(OSError, match=r"could not write .*g.npy \(OSError: \[Errno 28\] No space left on device; [\d.]+ MiB free"):
        result.save(tmp_path / "g.npy")
    assert (tmp_path / "g.npy").read_bytes() == b"before" and [p.name for p in tmp_path.iterdir()] == ["g.npy"]


def test_a_proxy_in_the_environment_is_skipped_for_loopback_and_named_where_it_fails(server: ServerProcess,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A desktop's proxy settings (GNOME exports ``all_proxy=socks://...``): ``ddpm generate`` against a server on
    127.0.0.1 was a traceback before any request ("Unknown scheme for proxy URL"; with ``socks5://``, "the 'socksio'
    package is not installed"), and with ``http_proxy`` naming a proxy that is down "cannot reach http://127.0.0.1:..."
    though that server answered. Loopback goes direct now; elsewhere the proxy is used and named where it fails."""
    from tests.server_process import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("all_proxy", "socks://127.0.0.1:1080/")
    monkeypatch.setenv("HTTP_PROXY", dead)
    monkeypatch.setenv("DDPM_API_TOKEN", TOKEN)
    for url in (server.url, server.url.replace("127.0.0.1", "localhost")):
        with Client(url, max_retries=0) as client:
            assert client.info()["model"]["name"] == "tiny", url
    with pytest.raises(ClientError, match=r"^cannot use the proxy all_proxy=socks://127.0.0.1:1080/: Unknown scheme .*"
                                          r"\(or set no_proxy=ddpm\.invalid to go direct\)$"):  # fmt: skip
        AsyncClient("https://ddpm.invalid:8000")  # https: no https_proxy, so all_proxy's
    with pytest.raises(client_module.Unreachable, match=rf"^cannot reach http://ddpm\.invalid:8000 through the proxy HTTP_PROXY={dead}: "):
        with Client("http://ddpm.invalid:8000", max_retries=0) as client:
            client.info()


@pytest.mark.parametrize(("environ", "url", "proxy"), [
    ({"all_proxy": "socks5://p:1080"}, "http://[::1]:8000", None),  # loopback, whatever is set
    ({"all_proxy": "socks5://p:1080"}, "http://127.8.0.1:8000", None),
    ({"all_proxy": "socks5://p:1080"}, "http://api.localhost:8000", None),
    ({"http_proxy": "p:3128"}, "http://ddpm.example.com", "http_proxy=http://p:3128"),  # a bare host:port is HTTP
    ({"http_proxy": "http://low:1", "HTTP_PROXY": "http://UP:1"}, "http://x.example.com", "http_proxy=http://low:1"),
    ({"HTTPS_PROXY": "http://s:1", "ALL_PROXY": "http://a:1"}, "https://x.example.com", "HTTPS_PROXY=http://s:1"),
    ({"HTTPS_PROXY": "http://s:1", "ALL_PROXY": "http://a:1"}, "http://x.example.com", "ALL_PROXY=http://a:1"),
    ({"http_proxy": "http://p:1", "no_proxy": "example.com"}, "http://ddpm.example.com:8000", None),  # its sub-domains
    ({"http_proxy": "http://p:1", "no_proxy": ".example.com"}, "http://example.com", None),
    ({"http_proxy": "http://p:1", "no_proxy": "ample.com"}, "http://example.com", "http_proxy=http://p:1"),  # not a suffix
    ({"http_proxy": "http://p:1", "NO_PROXY": "10.0.0.5, *"}, "http://x.example.com", None),
    ({"http_proxy": "http://p:1", "no_proxy": "10.0.0.5"}, "http://10.0.0.5:8000", None),
    ({"http_proxy": "http://p:1", "no_proxy": "  "}, "http://10.0.0.5:8000", "http_proxy=http://p:1"),
    ({"http_proxy": "http://p:1", "no_proxy": "10.0.0.0/8,fd00::/8"}, "http://10.9.8.7:8000", None),  # Docker's form
    ({"http_proxy": "http://p:1", "no_proxy": "10.0.0.0/8,fd00::/8"}, "http://[fd00::5]:8000", None),
    ({"http_proxy": "http://p:1", "no_proxy": "10.0.0.0/8"}, "http://11.0.0.1:8000", "http_proxy=http://p:1"),
    ({"http_proxy": "http://p:1", "no_proxy": "10.0.0.0/8"}, "http://ten.example.com", "http_proxy=http://p:1"),
    ({}, "http://x.example.com", None),
])  # fmt: skip
def test_the_proxy_the_environment_names(environ: dict[str, str], url: str, proxy: str | None) -> None:
    from service.client_proxy import environment_proxy

    found = environment_proxy(url, environ)
    assert (None if found is None else str(found)) == proxy


def test_the_client_joins_the_trace_its_environment_names(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """TRACEPARENT (OpenTelemetry's environment carrier: a traced CI job, a script under otel-cli) goes with every
    request as its traceparent, so the server's access line (and span) join that trace; one that is not valid is not sent."""
    trace = "0af7651916cd43dd8448eb211c80319c"
    monkeypatch.setenv("TRACEPARENT", f"00-{trace}-b7ad6b7169203331-01")
    with Client(server.url, token=TOKEN) as client:
        client.generate(seed=41, n=1, steps=2)
    server.wait_output(lambda out: f'"trace_id": "{trace}", "parent_id": "b7ad6b7169203331"' in out)
    monkeypatch.setenv("TRACEPARENT", f"00-{trace.upper()}-b7ad6b7169203331-01")  # upper-case hex: invalid (W3C 3.2.2)
    assert "traceparent" not in AsyncClient(server.url, token=TOKEN, _persistent=False)._headers
