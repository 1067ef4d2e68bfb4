"""The embedding cache on a real Zarr folder, with a counting embed function and with the tiny SAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import SamConfig
from pipeline.generalist.base import SlicePrompt
from pipeline.generalist.cache import NAME_HEX, EmbeddingCache, image_sha256
from pipeline.generalist.sam import SamGeneralist, load_sam

S, H, W = 6, 12, 10


class CountingEmbed:
    """A real embed function: (B, H, W) -> (B, 4, 2, 2) from block means, counting the slices it sees."""

    def __init__(self):
        self.calls = 0
        self.slices = 0

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.slices += len(slices)
        b = len(slices)
        out = np.empty((b, 4, 2, 2), np.float32)
        for k in range(4):
            out[:, k] = slices.mean(axis=(1, 2))[:, None, None] * (k + 1) + np.arange(4).reshape(2, 2) / 3
        return out


def _volume(seed: int = 0, s: int = S) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(s, H, W)).astype(np.float32) + np.arange(s, dtype=np.float32)[:, None, None]


def test_compute_once_then_hit(tmp_path):
    vol = _volume()
    embed = CountingEmbed()
    cache = EmbeddingCache(tmp_path / "emb.zarr", "counting")
    wanted = [1, 3, 4]
    out, cached = cache.get("case_a", vol, wanted, embed)
    assert cached == set()
    assert cache.misses == 3 and cache.hits == 0
    assert embed.slices == 3 and embed.calls == 1
    assert sorted(out) == wanted
    direct = CountingEmbed()(vol)
    for s in wanted:
        assert out[s].dtype == np.float32 and out[s].shape == (4, 2, 2)
        # the computed path returns the values as stored (float16), so a hit gives the same numbers
        np.testing.assert_array_equal(out[s], direct[s].astype(np.float16).astype(np.float32))

    out2, cached2 = cache.get("case_a", vol, wanted, embed)
    assert embed.calls == 1 and embed.slices == 3  # nothing computed
    assert cached2 == set(wanted)
    assert cache.hits == 3 and cache.misses == 3
    assert cache.stats() == {"cache_hits": 3, "cache_misses": 3}
    for s in wanted:
        assert out2[s].dtype == np.float32
        np.testing.assert_array_equal(out2[s], out[s])  # fresh or cached: bit-identical
    assert cache.get("case_a", vol, [], embed) == ({}, set())


def test_superset_computes_only_new_slices(tmp_path):
    vol = _volume()
    cache = EmbeddingCache(tmp_path / "emb.zarr", "counting")
    embed = CountingEmbed()
    cache.get("case_a", vol, [0, 2], embed)
    seen = []

    def recording(x):
        seen.append(x.copy())
        return embed(x)

    out, cached = cache.get("case_a", vol, [0, 1, 2, 5], recording)
    assert cached == {0, 2}
    assert embed.slices == 2 + 2
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], vol[[1, 5]])  # exactly the new slices, in order
    direct = CountingEmbed()(vol)
    for s in [0, 1, 2, 5]:
        np.testing.assert_allclose(out[s], direct[s], rtol=2e-3, atol=1e-3)
    assert cache.hits == 2 and cache.misses == 4


def test_new_cache_object_still_hits(tmp_path):
    vol = _volume()
    first = EmbeddingCache(tmp_path / "emb.zarr", "counting")
    out1, _ = first.get("case_a", vol, [0, 1, 2], CountingEmbed())
    # a restarted actor / the next round opens the same folder
    embed = CountingEmbed()
    second = EmbeddingCache(tmp_path / "emb.zarr", "counting")
    out2, cached = second.get("case_a", vol, [0, 1, 2], embed)
    assert embed.calls == 0 and cached == {0, 1, 2}
    assert second.hits == 3 and second.misses == 0
    for s in range(3):
        np.testing.assert_allclose(out2[s], out1[s], rtol=2e-3, atol=1e-3)
    # another generalist name is another group: no hit
    other = EmbeddingCache(tmp_path / "emb.zarr", "other-generalist")
    embed3 = CountingEmbed()
    _, cached3 = other.get("case_a", vol, [0, 1], embed3)
    assert cached3 == set() and embed3.slices == 2


def test_slice_count_change_recomputes(tmp_path):
    cache = EmbeddingCache(tmp_path / "emb.zarr", "counting")
    cache.get("case_a", _volume(0, s=6), [0, 1, 2], CountingEmbed())
    vol8 = _volume(1, s=8)
    embed = CountingEmbed()
    out, cached = cache.get("case_a", vol8, [0, 1, 7], embed)
    assert cached == set() and embed.slices == 3
    direct = CountingEmbed()(vol8)
    for s in [0, 1, 7]:
        np.testing.assert_allclose(out[s], direct[s], rtol=2e-3, atol=1e-3)  # as stored (float16)
    # the new image has its own array: slice 2 of the old volume is not taken for slice 2 of the new one
    embed2 = CountingEmbed()
    _, cached2 = cache.get("case_a", vol8, [0, 2, 7], embed2)
    assert cached2 == {0, 7} and embed2.slices == 1
    new_path = f"{cache.key}/case_a/{image_sha256(vol8)[:NAME_HEX]}"
    assert zarr.open_array(store=cache.root.zarr_store(), path=new_path, mode="r").shape[0] == 8


@pytest.fixture(scope="module")
def tiny_sam(tiny_sam_checkpoint):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    cfg = SamConfig(variant="tiny", checkpoint=tiny_sam_checkpoint)
    return SamGeneralist(load_sam(cfg, cpu), cfg, cpu)


def _sam_volume() -> np.ndarray:
    yy, xx = np.mgrid[:40, :32]
    vol = np.zeros((3, 40, 32), np.float32)
    rng = np.random.default_rng(3)
    for s in range(3):
        disc = (yy - 18 - s) ** 2 + (xx - 14) ** 2 <= (8 + s) ** 2
        vol[s] = 100 + 20 * rng.normal(size=(40, 32)) + 400 * disc
    return vol


def test_tiny_sam_cached_embedding_decodes_the_same(tmp_path, tiny_sam):
    vol = _sam_volume()
    prompts = [
        SlicePrompt(1, np.array([[14.0, 18.0], [3.0, 3.0]], np.float32), np.array([1, 0], np.int32),
                    np.array([6.0, 10.0, 22.0, 27.0], np.float32)),
        SlicePrompt(2, np.array([[25.0, 33.0]], np.float32), np.array([1], np.int32),
                    np.array([20.0, 28.0, 30.0, 38.0], np.float32)),
    ]
    fresh = tiny_sam.embed(vol)
    cache = EmbeddingCache(tmp_path / "emb.zarr", tiny_sam.name)
    first, _ = cache.get("case_a", vol, [0, 1, 2], tiny_sam.embed)
    calls = tiny_sam.encoder_calls
    cached, hit = EmbeddingCache(tmp_path / "emb.zarr", tiny_sam.name).get("case_a", vol, [0, 1, 2], tiny_sam.embed)
    assert hit == {0, 1, 2}
    assert tiny_sam.encoder_calls == calls  # the cached path does not run the encoder
    agreement = []
    for s in range(3):
        np.testing.assert_allclose(first[s], fresh[s], rtol=2e-3, atol=1e-3)  # returned as stored (float16)
        np.testing.assert_array_equal(cached[s], first[s])  # fresh and cached: the same numbers
        a = tiny_sam.decode(fresh[s], vol[s].shape, prompts)
        b = tiny_sam.decode(cached[s], vol[s].shape, prompts)
        assert a.masks.shape == (2, 40, 32)
        frac = a.masks.mean(axis=(1, 2))
        assert ((frac > 0.01) & (frac < 0.99)).all(), frac  # non-trivial masks: agreement means something
        agreement.append((a.masks == b.masks).mean())
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-2)
    assert min(agreement) > 0.99
