"""The response cache: identical requests answered byte-identically without a U-Net call, ETag and
If-None-Match (304), hit/miss counters, the bound, and off with 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm.sampler import ChainSpec
from service.response_cache import ImageKey, ResponseCache, etag_matches
from tests.app_client import app_client, metric, wait_ready
from tests.tiny_model import save_tiny_model

REQUEST = {"seed": 4, "batch_size": 3, "steps": 5, "sampler": "ddim", "eta": 0.5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_timesteps=30)


def test_cached_answers_are_byte_identical_to_computed_ones(model_dir: Path) -> None:
    with app_client(model_dir, compile="off") as c:
        wait_ready(c)
        iterations = metric(c, "ddpm_iterations_total")
        computed = c.post("/generate", json=REQUEST)
        assert computed.headers["x-cache"] == "miss" and computed.json()["cached"] is False
        assert metric(c, "ddpm_iterations_total") == iterations + 5
        again = c.post("/generate", json=REQUEST)
        assert again.headers["x-cache"] == "hit" and again.json()["cached"] is True
        assert again.json()["images"] == computed.json()["images"] and again.headers["etag"] == computed.headers["etag"]
        assert again.json()["timings"]["generation_s"] == 0
        assert metric(c, "ddpm_iterations_total") == iterations + 5  # no U-Net call
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
            {"batch_size": 2},
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
        # 7 distinct answers, 20 images of 8 x 8 float32 (256 bytes each)
        assert metric(c, "ddpm_response_cache_bytes") == 256 * (6 * 3 + 2)


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
        assert c.post("/generate", json=REQUEST, headers={"If-None-Match": "*"}).status_code == 304
        # invalid requests are still 422, whatever the header says
        assert c.post("/generate", json={**REQUEST, "steps": 0}, headers={"If-None-Match": "*"}).status_code == 422


def _key(seed: int) -> ImageKey:
    return ImageKey("sha", "fp32", "cpu", seed, 1, ChainSpec(5, "ddpm", 0.0, True, "trailing", 0))


def test_cache_is_bounded_lru_in_bytes() -> None:
    image = torch.zeros(1, 1, 8, 8)  # 256 bytes
    cache = ResponseCache(max_bytes=3 * 256)
    for seed in range(3):
        cache.put(_key(seed), image)
    assert cache.get(_key(0)) is not None  # 0 is now the most recent
    cache.put(_key(3), image)
    assert cache.get(_key(1)) is None and cache.get(_key(0)) is not None and len(cache) == 3 and cache.size_bytes == 768
    cache.put(_key(4), torch.zeros(1, 1, 16, 16))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(_key(4)) is None and len(cache) == 3
    off = ResponseCache(0)
    off.put(_key(0), image)
    assert not off.enabled and off.get(_key(0)) is None


def test_etag_comparison() -> None:
    etag = _key(0).etag("image/png")
    assert etag.startswith('"') and etag != _key(0).etag("application/json") and etag != _key(1).etag("image/png")
    assert etag_matches(etag, etag) and etag_matches(f"W/{etag}", etag) and etag_matches(f'"a", {etag}', etag)
    assert etag_matches("*", etag) and not etag_matches('"a"', etag) and not etag_matches(None, etag)
