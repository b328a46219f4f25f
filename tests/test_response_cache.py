"""The response cache: identical requests answered byte-identically without a U-Net call, ETag and
If-None-Match (304; ``*`` only for what the cache holds), ETags scoped to the model's fingerprint (weights,
config, code version), hit/miss counters, the bound, and off with 0."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.chain import ChainSpec
from ddpm.image_request import EditInput, ImageRequest
from service.response_cache import ENTRY_OVERHEAD_BYTES, ImageKey, ResponseCache, etag_matches
from tests.app_client import app_client, metric, wait_ready
from tests.batch_rounding import png_levels
from tests.tiny_model import copy_model_with, save_tiny_model

REQUEST = {"seed": 4, "batch_size": 3, "steps": 5, "sampler": "ddim", "eta": 0.5}
FULL_CHAIN = {"seed": 4, "batch_size": 2, "sampler": "ddpm", "clip_denoised": False}  # every beta and variance counts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=30)


def test_cached_answers_are_byte_identical_to_computed_ones(model_dir: Path) -> None:
    with app_client(model_dir, compile="off") as c:
        wait_ready(c)
        computed = c.post("/generate", json=REQUEST)
        assert computed.headers["x-cache"] == "miss" and computed.json()["cached"] is False
        assert metric(c, "ddpm_image_steps_total") == 3 * 5  # (rows may sit an iteration out: image-steps, not iterations)
        again = c.post("/generate", json=REQUEST)
        assert again.headers["x-cache"] == "hit" and again.json()["cached"] is True
        assert again.json()["images"] == computed.json()["images"] and again.headers["etag"] == computed.headers["etag"]
        assert again.json()["timings"]["generation_s"] == 0
        assert metric(c, "ddpm_image_steps_total") == 3 * 5  # no U-Net call
        # the other encodings of the cached images equal those of freshly computed ones
        for accept in ("image/png", "application/x-npy"):
            hit = c.post("/generate", json=REQUEST, headers={"Accept": accept})
            with app_client(model_dir, compile="off", response_cache_mb=0) as fresh:
                wait_ready(fresh)
                miss = fresh.post("/generate", json=REQUEST, headers={"Accept": accept})
                assert miss.headers["x-cache"] == "miss" and metric(fresh, 'ddpm_response_cache_lookups_total{result="miss"}') == 0
            assert hit.headers["x-cache"] == "hit" and hit.content == miss.content and hit.headers["etag"] == miss.headers["etag"]
        # any field of the chain or the seed is a different answer
        for change in (
            {"seed": 5},
            {"eta": 0.0},
            {"steps": 6},
            {"batch_size": 4},  # images 0..3: 3 is not held (0..1 would be: a part of the held answer)
            {"timestep_spacing": "leading"},
            {"clip_denoised": False},
        ):
            assert c.post("/generate", json={**REQUEST, **change}).headers["x-cache"] == "miss", change
        # the OpenAI endpoint and the stream share the cache
        oa = c.post("/v1/images/generations", json={"prompt": "x", "n": 3, **{k: v for k, v in REQUEST.items() if k != "batch_size"}})
        assert oa.headers["x-cache"] == "hit" and [d["b64_json"] for d in oa.json()["data"]] == computed.json()["images"]
        with c.stream("POST", "/generate/stream", json=REQUEST) as s:
            text = s.read().decode()
        assert '"cached": true' in text and computed.json()["images"][0] in text
        assert metric(c, 'ddpm_response_cache_lookups_total{result="hit"}') == 5
        assert metric(c, 'ddpm_response_cache_lookups_total{result="miss"}') == 7
        # 7 distinct answers, 22 images of 8 x 8 float32 (256 bytes each), and each entry's bookkeeping
        assert metric(c, "ddpm_response_cache_bytes") == 256 * (6 * 3 + 4) + 7 * ENTRY_OVERHEAD_BYTES


def test_if_none_match_is_304_without_work(model_dir: Path) -> None:
    with app_client(model_dir, compile="off", response_cache_mb=0) as c:  # the ETag does not need the cache
        wait_ready(c)
        first = c.post("/generate", json=REQUEST, headers={"Accept": "image/png"})
        etag = first.headers["etag"]
        iterations = metric(c, "ddpm_iterations_total")
        unchanged = c.post("/generate", json=REQUEST, headers={"Accept": "image/png", "If-None-Match": f'"other", {etag}'})
        assert unchanged.status_code == 304 and unchanged.content == b"" and unchanged.headers["etag"] == etag
        assert metric(c, "ddpm_iterations_total") == iterations and metric(c, "ddpm_response_not_modified_total") == 1
        # the ETag names the representation: the JSON answer of the same request has another
        as_json = c.post("/generate", json=REQUEST, headers={"If-None-Match": etag})
        assert as_json.status_code == 200 and as_json.headers["etag"] != etag
        assert c.post("/generate", json={**REQUEST, "seed": 9}, headers={"If-None-Match": etag}).status_code == 200
        # "*" is "any current representation" (RFC 9110 §13.1.2): with the cache off this replica holds
        # none, so the images are computed, not answered 304 for a chain never generated
        assert c.post("/generate", json={**REQUEST, "seed": 11}, headers={"If-None-Match": "*"}).status_code == 200
        # invalid requests are still 422, whatever the header says
        assert c.post("/generate", json={**REQUEST, "steps": 0}, headers={"If-None-Match": "*"}).status_code == 422


def test_if_none_match_star_matches_only_what_the_cache_holds(model_dir: Path) -> None:
    with app_client(model_dir, compile="off") as c:
        wait_ready(c)
        never = c.post("/generate", json={**REQUEST, "seed": 21}, headers={"If-None-Match": "*"})
        assert never.status_code == 200 and never.headers["x-cache"] == "miss"
        again = c.post("/generate", json={**REQUEST, "seed": 21}, headers={"If-None-Match": "*"})
        assert again.status_code == 304 and again.headers["etag"] == never.headers["etag"]


def test_an_etag_names_one_image(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights, another config (beta_end, variance type) or code version: another chain, so another
    ETag, and neither replica answers 304 to the other's."""
    variants = {
        "same": copy_model_with(model_dir, tmp_path / "same"),
        "reformatted": model_dir,  # the same JSON values, written differently above: the same model
        "beta_end": copy_model_with(model_dir, tmp_path / "beta", schedule__params__beta_end=0.03),
        "variance": copy_model_with(model_dir, tmp_path / "variance", variance_type="fixed_large"),
    }
    answers = {}
    for name, directory in variants.items():
        with app_client(directory, compile="off") as c:
            wait_ready(c)
            r = c.post("/generate", json=FULL_CHAIN, headers={"Accept": "image/png"})
            table = c.get("/schedule", params={"sampler": "ddpm"}).json()["chain"]["coefficients"]
            answers[name] = (r.headers["etag"], table, c.get("/info").json()["model"])
    assert answers["same"][0] == answers["reformatted"][0] and answers["same"][1] == answers["reformatted"][1]
    for changed in ("beta_end", "variance"):
        etag, png, info = answers[changed]
        assert info["weights_sha256"] == answers["same"][2]["weights_sha256"]  # the same weights ...
        assert png != answers["same"][1]  # ... and another chain (other images; this tiny model saturates them):
        assert etag != answers["same"][0] and info["fingerprint"] != answers["same"][2]["fingerprint"]
        with app_client(variants["same"], compile="off") as c:  # the other replica does not claim them
            wait_ready(c)
            assert c.post("/generate", json=FULL_CHAIN, headers={"Accept": "image/png", "If-None-Match": etag}).status_code == 200
    import ddpm

    monkeypatch.setattr(ddpm, "__version__", "999.0.0")  # a new release: its maths may differ
    from service import server_state as runtime

    monkeypatch.setattr(runtime, "__version__", "999.0.0")
    with app_client(variants["same"], compile="off") as c:
        wait_ready(c)
        assert c.post("/generate", json=FULL_CHAIN, headers={"Accept": "image/png"}).headers["etag"] != answers["same"][0]


def _key(seed: int) -> ImageKey:
    return ImageKey("sha", "fp32", "cpu", ImageRequest(seed, 1, ChainSpec(5, "ddpm", 0.0, True, "trailing", 0)))


def test_first_image_answers_images_k_of_the_seed_whichever_request_asks(model_dir: Path) -> None:
    """Images 0..63 of a seed were all a request could name (DDPM_MAX_IMAGES_PER_REQUEST): first_image names images
    k = first_image.. of it, the same images (up to the U-Net's batched rounding, README "Reproducibility") as any
    request that holds them, with their own cache entry and ETag."""
    with app_client(model_dir, compile="off") as c:
        wait_ready(c)
        part = c.post("/generate", json={**REQUEST, "batch_size": 2, "first_image": 3})
        assert part.status_code == 200 and part.headers["x-cache"] == "miss", part.text
        whole = c.post("/generate", json={**REQUEST, "batch_size": 5}).json()  # computed: the cache holds only 3..4
        assert part.json()["first_image"] == 3 and whole["first_image"] == 0 and whole["cached"] is False
        for got, want in zip(part.json()["images"], whole["images"][3:5], strict=True):
            assert np.abs(png_levels(got) - png_levels(want)).max() <= 1
        two = c.post("/generate", json={**REQUEST, "batch_size": 2})  # images 0 and 1: another answer, another ETag
        assert two.headers["etag"] != part.headers["etag"]
        assert np.abs(png_levels(two.json()["images"][0]) - png_levels(part.json()["images"][0])).max() > 8
        plain = c.post("/generate", json=REQUEST)
        zero = c.post("/generate", json={**REQUEST, "first_image": 0})  # said or not, 0 is the same answer
        assert zero.headers["x-cache"] == "hit" and zero.headers["etag"] == plain.headers["etag"]
        openai = c.post("/v1/images/generations", json={"prompt": "x", "n": 2, "seed": 4, "steps": 5, "sampler": "ddim", "eta": 0.5,
                                                         "first_image": 3})  # fmt: skip
        assert openai.headers["x-cache"] == "hit" and [d["b64_json"] for d in openai.json()["data"]] == part.json()["images"]
        assert openai.json()["first_image"] == 3
        for bad in (-1, "3", 2.0, 2**63):
            refused = c.post("/generate", json={**REQUEST, "first_image": bad})
            assert refused.status_code == 422 and "first_image" in refused.text, bad


def test_part_of_a_held_answer_is_answered_from_it(model_dir: Path) -> None:
    """Images 1..3 of a seed while the cache holds 0..4 (or 0..9 in two parts' entries, one of which has them all)
    are a hit: the held images' bytes, no U-Net call. Any other chain, seed, or a range past the held one is a miss."""
    with app_client(model_dir, compile="off") as c:
        wait_ready(c)
        whole = c.post("/generate", json={**REQUEST, "batch_size": 5})
        assert whole.headers["x-cache"] == "miss"
        image_steps = metric(c, "ddpm_image_steps_total")
        for first, n in ((1, 3), (0, 1), (4, 1), (0, 5)):
            part = c.post("/generate", json={**REQUEST, "batch_size": n, "first_image": first})
            assert part.headers["x-cache"] == "hit" and part.json()["cached"] is True, (first, n)
            assert part.json()["images"] == whole.json()["images"][first : first + n], (first, n)
            assert part.headers["etag"] != whole.headers["etag"] or (first, n) == (0, 5)  # the ETag names the range asked for
        npy = {"Accept": "application/x-npy"}
        held = np.load(io.BytesIO(c.post("/generate", json={**REQUEST, "batch_size": 5}, headers=npy).content))
        two = c.post("/generate", json={**REQUEST, "batch_size": 2, "first_image": 2}, headers=npy)
        assert two.headers["x-cache"] == "hit" and np.array_equal(np.load(io.BytesIO(two.content)), held[2:4])
        star = c.post("/generate", json={**REQUEST, "batch_size": 2, "first_image": 3}, headers={"If-None-Match": "*"})
        assert star.status_code == 304  # "any current representation": this replica holds those images
        assert metric(c, "ddpm_image_steps_total") == image_steps  # none of them ran the U-Net
        for change in ({"first_image": 5, "batch_size": 1}, {"seed": 5, "batch_size": 1}, {"eta": 0.0, "batch_size": 1}):
            assert c.post("/generate", json={**REQUEST, **change}).headers["x-cache"] == "miss", change  # past the held range
        # 3..5, which two entries hold between them (0..4 and the 5 just made): their images, no U-Net call
        image_steps = metric(c, "ddpm_image_steps_total")
        five = c.post("/generate", json={**REQUEST, "first_image": 5, "batch_size": 1}).json()["images"]
        across = c.post("/generate", json={**REQUEST, "first_image": 3, "batch_size": 3})
        assert across.headers["x-cache"] == "hit" and across.json()["images"] == whole.json()["images"][3:] + five
        assert metric(c, "ddpm_image_steps_total") == image_steps
        assert c.post("/generate", json={**REQUEST, "first_image": 4, "batch_size": 3}).headers["x-cache"] == "miss"  # 6 is not held


def _range_key(first: int, n: int, labels: tuple[int, ...] | None = None, seed: int = 0) -> ImageKey:
    return ImageKey("fp", "fp32", "cpu", ImageRequest(seed, n, ChainSpec(10, "restart", 0.0, True, "trailing", 0), labels, first=first))


def test_a_part_is_found_in_the_entry_that_holds_it_and_forgotten_with_it() -> None:
    images = torch.arange(8.0).reshape(8, 1, 1, 1)
    cache = ResponseCache(max_bytes=1 << 20)
    cache.put(_range_key(10, 8, tuple(range(8))), images)  # images 10..17 of seed 0, class k - 10 each
    got = cache.get(_range_key(12, 3, (2, 3, 4)))
    assert got is not None and got.flatten().tolist() == [2.0, 3.0, 4.0] and _range_key(17, 1, (7,)) in cache
    assert cache.get(_range_key(12, 3, (2, 3, 5))) is None  # another class for image 14: other images
    assert cache.get(_range_key(12, 3)) is None  # no label (the null label): other images
    for first, n in ((9, 2), (16, 3), (18, 1)):
        assert cache.get(_range_key(first, n, tuple(range(first - 10, first - 10 + n)))) is None, (first, n)
    assert cache.get(_range_key(12, 3, (2, 3, 4), seed=1)) is None
    cache.put(_range_key(0, 1, (0,)), images[:1])  # a shorter entry of the same seed does not hide the longer one
    assert cache.get(_range_key(15, 2, (5, 6))) is not None
    small = ResponseCache(max_bytes=entry_bytes_of(images))  # room for one entry: the next put evicts the first
    small.put(_range_key(10, 8, tuple(range(8))), images)
    small.put(_range_key(0, 8, tuple(range(8)), seed=1), images)
    assert small.get(_range_key(12, 3, (2, 3, 4))) is None and len(small) == 1 and _range_key(12, 3, (2, 3, 4)) not in small


def test_a_range_across_held_entries_is_their_images_in_order() -> None:
    """Images 60..69 while 0..63 and 64..127 are held (``ddpm generate -n 128`` asked in two parts): the two slices
    joined; a gap, another label on either side, or another seed is a miss."""
    cache = ResponseCache(max_bytes=1 << 20)
    low, high = torch.arange(64.0).reshape(64, 1, 1, 1), torch.arange(64.0, 128.0).reshape(64, 1, 1, 1)
    cache.put(_range_key(0, 64, tuple(k % 3 for k in range(64))), low)
    cache.put(_range_key(64, 64, tuple(k % 3 for k in range(64, 128))), high)
    got = cache.get(_range_key(60, 10, tuple(k % 3 for k in range(60, 70))))
    assert got is not None and got.flatten().tolist() == list(range(60, 70))
    assert cache.get(_range_key(60, 10, (*(k % 3 for k in range(60, 69)), 1))) is None  # image 69 (class 0): another class
    assert cache.get(_range_key(60, 10, (1, *(k % 3 for k in range(61, 70))))) is None  # image 60 (class 0): another class
    assert cache.get(_range_key(120, 10, tuple(k % 3 for k in range(120, 130)))) is None  # 128.. are not held
    gapped = ResponseCache(max_bytes=1 << 20)
    gapped.put(_range_key(0, 4), low[:4])
    gapped.put(_range_key(5, 4), low[5:9])
    assert gapped.get(_range_key(2, 5)) is None and _range_key(2, 5) not in gapped  # image 4 is missing
    gapped.put(_range_key(3, 2), low[3:5])  # an entry overlapping both: the range is whole now
    assert gapped.get(_range_key(1, 7)).flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # type: ignore[union-attr]


def entry_bytes_of(images: torch.Tensor) -> int:
    return images.numel() * images.element_size() + ENTRY_OVERHEAD_BYTES


def test_cache_is_bounded_lru_in_bytes() -> None:
    image = torch.zeros(1, 1, 8, 8)  # 256 bytes
    entry = 256 + ENTRY_OVERHEAD_BYTES
    cache = ResponseCache(max_bytes=3 * entry)
    for seed in range(3):
        cache.put(_key(seed), image)
    assert cache.get(_key(0)) is not None  # 0 is now the most recent
    cache.put(_key(3), image)
    assert cache.get(_key(1)) is None and cache.get(_key(0)) is not None and len(cache) == 3 and cache.size_bytes == 3 * entry
    cache.put(_key(4), torch.zeros(1, 1, 64, 64))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(_key(4)) is None and len(cache) == 3
    off = ResponseCache(0)
    off.put(_key(0), image)
    assert not off.enabled and off.get(_key(0)) is None


def test_a_view_is_stored_compact_and_counted_whole() -> None:
    batch = torch.zeros(64, 1, 8, 8)  # a view of one image would otherwise hold all 64
    cache = ResponseCache(max_bytes=1 << 20)
    cache.put(_key(0), batch[3:4])
    held = cache.get(_key(0))
    assert held is not None and held.untyped_storage().nbytes() == 256 and cache.size_bytes == 256 + ENTRY_OVERHEAD_BYTES


def test_etag_comparison() -> None:
    etag = _key(0).etag("image/png")
    assert etag.startswith('"') and etag != _key(0).etag("application/json") and etag != _key(1).etag("image/png")
    assert etag_matches(etag, etag, held=False) and etag_matches(f"W/{etag}", etag, held=False)
    assert etag_matches(f'"a", {etag}', etag, held=False) and etag_matches("*", etag, held=True)
    assert not etag_matches("*", etag, held=False) and not etag_matches('"a"', etag, held=True)
    assert not etag_matches(None, etag, held=True)


def test_etags_are_pinned_across_refactors() -> None:
    """The ETag of a plain and of an edit request, as the releases before the request object named them:
    a client's cached answers stay valid across a restructure that changes no pixel."""
    plain = ImageKey("fp", "bf16", "cpu", ImageRequest(7, 2, ChainSpec(10, "restart", 0.0, True, "trailing", 0)))
    assert plain.etag("image/png") == '"86b6e50a582e9ba6ad5498de5f32765f"'
    chain = ChainSpec(20, "ddpm", 0.0, True, "trailing", 0, 1.0, True, 5, 2)
    edit = ImageKey("fp", "fp32", "cpu", ImageRequest(3, 1, chain, (4,), 1.5, EditInput("abc", torch.zeros(1))))
    assert edit.etag("application/json") == '"7324c96254942cd24a2304e14790bd60"'
    later = ImageKey("fp", "bf16", "cpu", ImageRequest(7, 2, ChainSpec(10, "restart", 0.0, True, "trailing", 0), first=3))
    assert later.etag("image/png") not in (plain.etag("image/png"), '"86b6e50a582e9ba6ad5498de5f32765f"')
