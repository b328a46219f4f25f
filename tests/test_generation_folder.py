"""``ddpm generate -o folder/`` and ``Client.generate_folder`` (service/generation_folder.py): one PNG per image, the
server's bytes; parts several at a time; a resume asks only for what is missing, with the folder's chain; another
chain, model or precision refused, before any work where it can be told and never mixed in; a Ctrl-C leaves whole
files and says what is there."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.client import Client
from service.generation_folder import RECORD_NAME, FolderRefused, GenerationFolder, image_name, parts_of
from tests.command_in_process import WITHOUT_TORCH
from tests.server_process import ServerProcess
from tests.tiny_model import save_tiny_model

CHAIN = {"steps": 4, "sampler": "dpmsolver++"}
FLAGS = ["--steps", "4", "--sampler", "dpmsolver++"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=100)


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[ServerProcess]:
    # 5 images a request: parts; no response cache: every part is the engine's
    s = ServerProcess(model, DDPM_MAX_IMAGES_PER_REQUEST="5", DDPM_RESPONSE_CACHE_MB="0", DDPM_COMPILE="off", DDPM_PRECISION="fp32")
    s.wait_ready()
    yield s
    s.stop()


def served_pngs(server: ServerProcess, seed: int, first: int, n: int, **chain: object) -> list[bytes]:
    """Images first..first+n-1 of ``seed`` as one request gets them (in parts of the server's 5)."""
    pngs = []
    for k in range(first, first + n, 5):
        body = {"seed": seed, "batch_size": min(5, first + n - k), "first_image": k, **CHAIN, **chain}
        answer = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        pngs += [base64.b64decode(png) for png in answer.json()["images"]]
    return pngs


def generate(server: ServerProcess, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", WITHOUT_TORCH, "generate", "--url", server.url, *argv]  # a client: no torch imported
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "DDPM_API_TOKEN": ""})


def test_parts_are_runs_of_the_missing_images_cut_to_the_bound() -> None:
    assert parts_of([0, 1, 2, 3, 4, 5, 6], 3) == [(0, 3), (3, 3), (6, 1)]
    assert parts_of([2, 3, 7, 8, 9, 12], 5) == [(2, 2), (7, 3), (12, 1)]
    assert parts_of([], 4) == []


def test_a_folder_holds_the_servers_images_and_a_resume_asks_only_for_the_missing(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "set"
    first = generate(server, "--seed", "7", "-n", "12", "--first-image", "3", *FLAGS, "--parallel", "2", "-o", f"{out}/")
    assert first.returncode == 0, first.stderr
    said = json.loads(first.stdout)
    assert {k: said[k] for k in ("images", "written", "already_there", "requests", "sampler", "steps")} == {
        "images": 12, "written": 12, "already_there": 0, "requests": 3, "sampler": "dpmsolver++", "steps": 4}  # fmt: skip
    assert "12/12 images" in first.stderr  # the bar counts images written
    expected = served_pngs(server, 7, 3, 20)
    assert sorted(p.name for p in out.iterdir()) == sorted([RECORD_NAME] + [image_name(k) for k in range(3, 15)])
    assert [(out / image_name(k)).read_bytes() for k in range(3, 15)] == expected[:12]  # the server's PNGs, byte for byte
    record = json.loads((out / RECORD_NAME).read_text(encoding="utf-8"))
    info = httpx.get(server.url + "/info").json()
    assert record["fingerprint"] == info["model"]["fingerprint"] and record["precision"] == "fp32" and record["seed"] == 7
    assert (record["sampler"], record["steps"], record["clip_denoised"]) == ("dpmsolver++", 4, True)

    (out / image_name(5)).unlink()
    (out / image_name(9)).unlink()
    kept = (out / image_name(4)).stat().st_mtime_ns
    before = server.metric("ddpm_images_generated_total")
    # no chain flags: the folder's chain is sent, not the server's default (restart, 10 steps)
    resumed = generate(server, "--seed", "7", "-n", "20", "--first-image", "3", "-o", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    said = json.loads(resumed.stdout)
    assert (said["written"], said["already_there"], said["requests"], said["sampler"]) == (10, 10, 4, "dpmsolver++")
    assert server.metric("ddpm_images_generated_total") - before == 10  # 5, 9, and 15..22: asked as (5), (9), (15-19), (20-22)
    assert [(out / image_name(k)).read_bytes() for k in range(3, 23)] == expected
    assert (out / image_name(4)).stat().st_mtime_ns == kept  # an image there is not asked for or written again

    again = generate(server, "--seed", "7", "-n", "20", "--first-image", "3", "-o", str(out), "--quiet")
    assert again.returncode == 0 and json.loads(again.stdout)["requests"] == 0


@pytest.mark.parametrize(("argv", "said"), [
    (["--seed", "8"], "--seed: the folder's images have 7, this command asks for 8"),
    (["--steps", "6"], "--steps: the folder's images have 4, this command asks for 6"),
    (["--sampler", "ddim", "--eta", "0.5"], '--sampler: the folder\'s images have "dpmsolver++", this command asks for "ddim"; '
                                            "--eta: the folder's images have 0.0, this command asks for 0.5"),
    (["--clip", "off"], "--clip: the folder's images have true, this command asks for false"),
])  # fmt: skip
def test_another_chain_is_refused_before_the_server_is_asked(argv: list[str], said: str, server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "set"
    assert generate(server, "--seed", "7", "-n", "2", *FLAGS, "-o", f"{out}/", "--quiet").returncode == 0
    before = server.metric("ddpm_requests_total")
    refused = generate(server, "--seed", "7", "-n", "4", *FLAGS, *argv, "-o", str(out))
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"ddpm generate: -o {out} holds another chain's images: {said}: name another folder"
    assert server.metric("ddpm_requests_total") == before and len(list(out.glob("*.png"))) == 2


def test_what_is_not_a_folder_of_this_command_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "000001.png").write_bytes(b"a photo")
    refused = generate(server, "-n", "2", "-o", str(photos))
    assert refused.returncode == 1
    assert "holds 1 file (000001.png) and no ddpm-generate.json: not a folder of ddpm generate" in refused.stderr
    assert (photos / "000001.png").read_bytes() == b"a photo"
    listed = generate(server, "-n", "2", "--class-label", "1,2", "-o", f"{tmp_path}/labels/")
    assert listed.returncode == 1 and "a folder takes one class label or 'balanced'" in listed.stderr
    hint = generate(server, "-n", "2", "-o", f"{tmp_path}/noname")
    assert hint.returncode == 1 and f"a folder of one PNG per image: {tmp_path}/noname/" in hint.stderr
    grid = generate(server, "-n", "2", "--ncols", "2", "-o", f"{tmp_path}/g/")
    assert grid.returncode == 1 and "--ncols is a grid's" in grid.stderr


def test_a_replica_of_another_precision_behind_the_balancer_is_refused_not_mixed_in(server: ServerProcess, model: Path,
                                                                                     tmp_path: Path) -> None:  # fmt: skip
    """Two replicas of one model behind a round-robin balancer, one in fp32 and one in bf16 (a fleet of mixed machines
    with DDPM_PRECISION=auto): the folder keeps the first answer's images and refuses the other replica's, writing
    nothing of it; a resume against the bf16 replica alone is refused before any work."""
    other = ServerProcess(model, DDPM_MAX_IMAGES_PER_REQUEST="5", DDPM_RESPONSE_CACHE_MB="0", DDPM_COMPILE="off",
                          DDPM_PRECISION="bf16")  # fmt: skip
    try:
        other.wait_ready()
        replicas, turn = [server.url, other.url], count()

        async def balance(request: httpx.Request) -> httpx.Response:  # each request to the next replica
            url = replicas[next(turn) % 2] if request.url.path != "/info" else server.url
            async with httpx.AsyncClient() as direct:
                answer = await direct.request(request.method, url + request.url.raw_path.decode(), content=request.content,
                                              headers=request.headers, timeout=60)  # fmt: skip
                return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

        out = tmp_path / "set"
        with Client("http://balancer", transport=httpx.MockTransport(balance), max_retries=0) as client, pytest.raises(
            FolderRefused, match="precision \"fp32\" there, \"bf16\" here"
        ):  # fmt: skip
            client.generate_folder(out, 3, 10, per_request=5, **CHAIN)
        assert sorted(p.name for p in out.glob("*.png")) == [image_name(k) for k in range(5)]
        assert [p.read_bytes() for p in sorted(out.glob("*.png"))] == served_pngs(server, 3, 0, 5)

        with Client(other.url) as client, pytest.raises(FolderRefused, match="the server serves model \"tiny\""):
            client.generate_folder(out, 3, 10, per_request=5, **CHAIN)
        assert other.metric("ddpm_images_generated_total") == 5  # only the balancer's one part
    finally:
        other.stop()


def test_an_edits_folder_asks_for_its_input_again(server: ServerProcess, tmp_path: Path) -> None:
    from PIL import Image

    photo = tmp_path / "seven.png"
    Image.new("L", (8, 8), 200).save(photo)
    out = tmp_path / "edits"
    made = generate(server, "-n", "3", *FLAGS, "--init-image", str(photo), "--strength", "0.5", "-o", f"{out}/", "--quiet")
    assert made.returncode == 0, made.stderr
    assert json.loads((out / RECORD_NAME).read_text(encoding="utf-8"))["strength"] == 0.5
    bare = generate(server, "-n", "5", "-o", str(out))
    assert bare.returncode == 1 and "the folder's images are edits of an input (input_sha256" in bare.stderr
    Image.new("L", (8, 8), 10).save(photo)  # another input under the same name: told by the answer's input_sha256
    other = generate(server, "-n", "5", "--init-image", str(photo), "-o", str(out), "--quiet")
    assert other.returncode == 1 and "input_sha256" in other.stderr and len(list(out.glob("*.png"))) == 3
    Image.new("L", (8, 8), 200).save(photo)
    resumed = generate(server, "-n", "5", "--init-image", str(photo), "-o", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr  # strength and the chain from the folder
    assert json.loads(resumed.stdout)["written"] == 2


def test_a_ctrl_c_leaves_whole_images_and_the_same_command_makes_the_rest(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "set"
    argv = [sys.executable, "-c", WITHOUT_TORCH, "generate", "--url", server.url, "--seed", "2", "-n", "30", "--sampler", "ddpm",
            "--steps", "100", "-o", f"{out}/", "--quiet"]  # fmt: skip  # 6 parts of 100 calls
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "DDPM_API_TOKEN": ""})
    end = time.monotonic() + 60
    while not list(out.glob("*.png")) and time.monotonic() < end:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    there = sorted(out.glob("*.png"))
    assert proc.returncode == 130 and 5 <= len(there) < 30, stderr
    assert f"interrupted: {len(there)} of 30 images are in {out}/; the same command asks for the rest" in stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "DDPM_API_TOKEN": ""})
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["already_there"] == len(there)
    chain = {"sampler": "ddpm", "steps": 100}
    assert [(out / image_name(k)).read_bytes() for k in range(30)] == served_pngs(server, 2, 0, 30, **chain)


def test_a_record_written_meanwhile_by_another_command_is_the_one_kept(tmp_path: Path) -> None:
    """Two commands starting one folder at once: the record is created once (no overwrite), and the second checks its
    answers against the first's record."""
    import io

    from PIL import Image

    from service.client import Generation

    folder, late = GenerationFolder.open(tmp_path), GenerationFolder.open(tmp_path)
    meta = {"seed": 1, "fingerprint": "f", "precision": "fp32", "sampler": "ddim", "steps": 4, "eta": 0.0, "timestep_spacing": "trailing",
            "clip_denoised": True, "guidance_scale": 0.0, "strength": 1.0, "jump_length": None, "jump_n_sample": None,
            "input_sha256": None, "model": "m"}  # fmt: skip
    png = io.BytesIO()
    Image.new("L", (2, 2)).save(png, format="PNG")
    folder.accept(Generation([png.getvalue()], meta), 0, 1)
    with pytest.raises(FolderRefused, match='precision "fp32" there, "bf16" here'):
        late.accept(Generation([png.getvalue()], {**meta, "precision": "bf16"}), 1, 1)
    assert json.loads((tmp_path / RECORD_NAME).read_text(encoding="utf-8"))["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [image_name(0), RECORD_NAME]


def test_an_answer_whose_png_is_cut_short_writes_nothing(server: ServerProcess, tmp_path: Path) -> None:
    """A PNG cut short on the way (a proxy that truncated a body and kept its length, a disk's bit flip in a cache): an
    image written would be there for good, never asked for again; it is refused whole instead."""
    from service.client import BadAnswer, Generation

    png = served_pngs(server, 0, 0, 1)[0]
    meta = {**httpx.post(server.url + "/generate", json={"seed": 0, "batch_size": 1, **CHAIN}, timeout=60).json(), "images": None}
    folder = GenerationFolder.open(tmp_path)
    for broken in (png[:-20], png[:40] + bytes([png[40] ^ 1]) + png[41:]):  # its end cut; one bit of a chunk flipped (its CRC)
        with pytest.raises(BadAnswer, match="image 0 of the answer is not a whole PNG"):
            folder.accept(Generation([png, broken][1:], meta), 0, 1)
    assert list(tmp_path.glob("*.png")) == []
    folder.accept(Generation([png], meta), 0, 1)
    assert (tmp_path / image_name(0)).read_bytes() == png


def test_a_full_disk_keeps_the_images_written_and_says_the_space_left(server: ServerProcess, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The disk fills up at the second part: the first part's images stay whole, no temporary file is left, and the
    line says which file, the space left and what is there; a folder named like an image file is refused as before."""
    import errno

    from tests.command_in_process import run_command

    real_write = Path.write_bytes

    def fills_up(self: Path, data: bytes) -> int:
        if len(list(self.parent.glob("*.png"))) >= 5:  # as a full disk answers: part written, then ENOSPC
            real_write(self, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    out = tmp_path / "set"
    ran = run_command(["generate", "--url", server.url, "-n", "8", *FLAGS, "-o", f"{out}/", "--quiet"])
    assert ran.code == 1, ran.stderr
    assert ran.stderr.strip().startswith(f"ddpm generate: -o {out}/: could not write {out}/{image_name(5)} (OSError: [Errno 28] No space")
    assert ran.stderr.strip().endswith("MiB free there) (5 of 8 images are in " + f"{out}/)")
    assert sorted(p.name for p in out.iterdir()) == [image_name(k) for k in range(5)] + [RECORD_NAME]
    assert [p.read_bytes() for p in sorted(out.glob("*.png"))] == served_pngs(server, 0, 0, 5)
    monkeypatch.undo()
    (tmp_path / "grid.png").mkdir()
    named = run_command(["generate", "--url", server.url, "-n", "1", "-o", str(tmp_path / "grid.png")])
    assert named.code == 1
    assert named.stderr.strip() == f"ddpm generate: -o {tmp_path}/grid.png: a folder is there; name a file in it, or another file"


def test_parts_over_the_servers_call_bound_are_asked_for_smaller(model: Path, tmp_path: Path) -> None:
    """A chain whose parts cost more U-Net calls than DDPM_MAX_CALLS_PER_REQUEST (a long or guided chain at 64 images:
    the command failed at its first part, and nothing on the client's side could make the parts smaller): the 422 says
    how many calls an image costs (its ``ctx``), and the command asks for the rest in parts that fit."""
    s = ServerProcess(model, DDPM_MAX_IMAGES_PER_REQUEST="5", DDPM_MAX_CALLS_PER_REQUEST="12", DDPM_COMPILE="off",
                      DDPM_PRECISION="fp32")  # fmt: skip  # 4 calls an image: 3 images a request
    try:
        s.wait_ready()
        assert httpx.get(s.url + "/info").json()["limits"]["max_calls_per_request"] == 12
        refused = httpx.post(s.url + "/generate", json={"seed": 1, "batch_size": 5, **CHAIN}, timeout=60)
        assert refused.status_code == 422 and refused.json()["errors"][0]["ctx"] == {"cost": 20, "bound": 12, "calls_per_image": 4}
        whole = generate(s, "--seed", "1", "-n", "8", *FLAGS, "-o", str(tmp_path / "x.npy"))
        assert whole.returncode == 0, whole.stderr
        assert json.loads(whole.stdout)["batch_size"] == 8 and "32/32" in whole.stderr  # one bar over 3 parts
        folder = generate(s, "--seed", "1", "-n", "8", *FLAGS, "--parallel", "2", "-o", f"{tmp_path}/set/", "--quiet")
        assert folder.returncode == 0, folder.stderr
        assert json.loads(folder.stdout)["requests"] == 3  # (0-2), (3-5), (6-7) after the two refused parts of 5
        direct = [httpx.post(s.url + "/generate", json={"seed": 1, "batch_size": 2, "first_image": k, **CHAIN}, timeout=60).json()
                  for k in range(0, 8, 2)]  # fmt: skip
        assert [(tmp_path / "set" / image_name(k)).read_bytes() for k in range(8)] == [
            base64.b64decode(png) for answer in direct for png in answer["images"]]  # fmt: skip
        too_long = generate(s, "--seed", "1", "-n", "2", "--steps", "13", "-o", str(tmp_path / "y.npy"), "--quiet")
        assert too_long.returncode == 1 and "(2 images x 13 calls each); the bound is 12" in too_long.stderr  # one image is over
    finally:
        s.stop()


def test_ddpm_sample_fills_the_same_folder_offline(server: ServerProcess, model: Path, tmp_path: Path) -> None:
    """A folder begun by ``ddpm generate`` and finished by ``ddpm sample`` with no chain flags (the record's chain, not
    ddpm sample's own default of the full chain): the server's images, byte for byte (offline = served, alone and at
    the same batch); another precision is refused before any sampling, and a folder made offline is resumed offline."""
    from tests.command_in_process import run_command

    out = tmp_path / "set"
    assert generate(server, "--seed", "4", "-n", "5", *FLAGS, "-o", f"{out}/", "--quiet").returncode == 0
    finished = run_command(["sample", "--model", str(model), "--seed", "4", "-n", "10", "--batch-size", "5", "--precision", "fp32",
                            "--compile", "off", "-o", str(out), "--quiet"])  # fmt: skip
    assert finished.code == 0, finished.stderr
    said = json.loads(finished.stdout)
    assert (said["already_there"], said["written"], said["sampler"], said["steps"]) == (5, 5, "dpmsolver++", 4)
    assert [(out / image_name(k)).read_bytes() for k in range(10)] == served_pngs(server, 4, 0, 10)
    other = run_command(["sample", "--model", str(model), "--seed", "4", "-n", "12", "--precision", "bf16", "-o", str(out), "--quiet"])
    assert other.code == 1 and other.stderr.strip() == (
        f'ddpm sample: -o {out} holds the images of model "tiny"; this command\'s is "tiny": precision "fp32" there, "bf16" '
        "here (a fleet that must give the same images pins DDPM_PRECISION and serves one model): nothing of it written")  # fmt: skip
    assert len(list(out.glob("*.png"))) == 10
    offline = tmp_path / "offline"
    argv = ["sample", "--model", str(model), "--seed", "4", "--sampler", "ddim", "--steps", "3", "--eta", "0.5", "--precision", "fp32",
            "--compile", "off", "--batch-size", "4", "-o", f"{offline}/", "--quiet"]  # fmt: skip
    assert run_command([*argv, "-n", "3"]).code == 0
    resumed = run_command([*argv[:3], "--seed", "4", "--precision", "fp32", "-n", "6", "-o", str(offline), "--quiet"])
    assert resumed.code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["written"] == 3 and json.loads(resumed.stdout)["sampler"] == "ddim"
    whole = run_command([*argv, "-n", "6", "-o", str(tmp_path / "whole.npy")])
    assert whole.code == 0
    from PIL import Image

    pixels = [np.asarray(Image.open(offline / image_name(k))) for k in range(6)]
    assert np.array_equal(np.stack(pixels), np.round(np.load(tmp_path / "whole.npy")[:, 0] * 255))
