"""The content-addressed embedding cache shared across runs (issue 9 item 4).

Keys: the same checkpoint bytes and preprocessing hit across cache objects (two runs); another checkpoint,
also at the same path, or any changed preprocessing field misses; a changed image under the same case id
is detected and recomputed. Concurrency: writers racing on one case leave every slice readable and right.
End to end: two runs with one ``generalist.cache_dir`` share their embeddings.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from pipeline.config import SamConfig, config_from_dict, load_config
from pipeline.errors import StoreError
from pipeline.generalist.cache import NAME_HEX, EmbeddingCache, cache_key, image_sha256
from pipeline.generalist.encoder_runtime import resolve_sam_config
from pipeline.generalist.sam import (
    SamGeneralist,
    embedding_key_fields,
    load_sam,
    sam_embedding_cache,
    save_tiny_sam,
)
from pipeline.preflight import preflight
from pipeline.storage import Location, check_writable, file_sha256
from pipeline.store import PseudoLabelStore
from semisam.launch import run_with_stats
from tests.conftest import moto_s3, small_config_dict

CPU = torch.device("cpu")


def _volume(seed: int = 3, s: int = 3) -> np.ndarray:
    """float32 (S, 40, 32): a bright disc on noise, so embeddings differ from slice to slice."""
    yy, xx = np.mgrid[:40, :32]
    rng = np.random.default_rng(seed)
    vol = np.zeros((s, 40, 32), np.float32)
    for k in range(s):
        disc = (yy - 18 - k) ** 2 + (xx - 14) ** 2 <= (8 + k) ** 2
        vol[k] = 100 + 20 * rng.normal(size=(40, 32)) + 400 * disc
    return vol


def _sam(checkpoint: Path, **cfg) -> tuple[SamGeneralist, SamConfig]:
    sam_cfg = SamConfig(variant="tiny", checkpoint=str(checkpoint), **cfg)
    gen = SamGeneralist(load_sam(sam_cfg, CPU), sam_cfg, CPU)
    return gen, gen.cfg  # resolved for the CPU, as the cache key needs


def _as_stored(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


class CountingEmbed:
    """(B, H, W) -> (B, 4, 2, 2) from slice means; counts slices; ``scale`` stands for other weights."""

    def __init__(self, scale: float = 1.0, barrier: threading.Barrier | None = None):
        self.scale, self.barrier, self.slices = scale, barrier, 0

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        if self.barrier is not None:
            self.barrier.wait(timeout=30)  # both writers hold their embeddings before either writes
        self.slices += len(slices)
        m = slices.mean(axis=(1, 2)) * self.scale
        return (m[:, None, None, None] * np.arange(1, 5)[None, :, None, None] * np.ones((1, 1, 2, 2))).astype(np.float32)


# -- (a) two runs, one checkpoint ---------------------------------------------------------------------------
def test_second_run_reads_the_first_runs_embeddings(tmp_path, tiny_sam_checkpoint):
    vol, wanted = _volume(), [0, 1, 2]
    shared = tmp_path / "cache"
    gen1, cfg = _sam(tiny_sam_checkpoint)
    first, cached1 = sam_embedding_cache(shared, cfg, 0, "float16").get("case_a", vol, wanted, gen1.embed)
    assert cached1 == set() and gen1.encoder_calls == 3
    # another run: its own actor, generalist and cache object, the same checkpoint file and settings
    gen2, cfg2 = _sam(tiny_sam_checkpoint)
    cache2 = sam_embedding_cache(shared, cfg2, 0, "float16")
    second, cached2 = cache2.get("case_a", vol, wanted, gen2.embed)
    assert cached2 == set(wanted) and gen2.encoder_calls == 0
    assert cache2.stats() == {"cache_hits": 3, "cache_misses": 0}
    fresh = gen2.embed(vol)
    for s in wanted:
        np.testing.assert_allclose(first[s], fresh[s], rtol=2e-3, atol=1e-3)  # returned as stored (float16)
        np.testing.assert_array_equal(second[s], first[s])  # fresh and cached: the same numbers
    # what the key means is readable in the key's group
    attrs = zarr.open_group(store=Location.of(shared).zarr_store(), path=cache2.key, mode="r").attrs.asdict()
    assert attrs["checkpoint_sha256"] == file_sha256(Location.of(tiny_sam_checkpoint))
    assert attrs["variant"] == "tiny" and attrs["image_size"] == 64 and attrs["slice_axis"] == 0
    assert cache_key(attrs) == cache2.key


# -- (b) another checkpoint ---------------------------------------------------------------------------------
def test_a_checkpoint_changed_under_the_same_path_misses(tmp_path, tiny_sam_checkpoint):
    vol, wanted = _volume(), [0, 2]
    ckpt = tmp_path / "sam.pt"
    shutil.copy(tiny_sam_checkpoint, ckpt)
    gen, cfg = _sam(ckpt)
    old, _ = sam_embedding_cache(tmp_path / "cache", cfg, 0, "float16").get("case_a", vol, wanted, gen.embed)
    save_tiny_sam(ckpt, seed=1)  # same variant and path, other weights
    gen_new, cfg_new = _sam(ckpt)
    cache = sam_embedding_cache(tmp_path / "cache", cfg_new, 0, "float16")
    out, cached = cache.get("case_a", vol, wanted, gen_new.embed)
    assert cached == set() and gen_new.encoder_calls == 2 and cache.misses == 2
    fresh = gen_new.embed(vol)
    for s in wanted:
        np.testing.assert_allclose(out[s], fresh[s], rtol=2e-3, atol=1e-3)
        assert not np.allclose(out[s], old[s], atol=1e-2)  # the stale values really were wrong
    # the old config names the same path: it now means the new weights and reads their entries, never the old
    again, cached_old = sam_embedding_cache(tmp_path / "cache", cfg, 0, "float16").get(
        "case_a", vol, wanted, CountingEmbed())
    assert cached_old == set(wanted)
    for s in wanted:
        np.testing.assert_array_equal(again[s], out[s])


def test_another_checkpoint_file_misses(tmp_path, tiny_sam_checkpoint):
    other = save_tiny_sam(tmp_path / "other.pt", seed=1)
    vol = _volume()
    gen, cfg = _sam(tiny_sam_checkpoint)
    sam_embedding_cache(tmp_path / "cache", cfg, 0, "float16").get("case_a", vol, [0, 1], gen.embed)
    gen_o, cfg_o = _sam(other)
    cache = sam_embedding_cache(tmp_path / "cache", cfg_o, 0, "float16")
    out, cached = cache.get("case_a", vol, [0, 1], gen_o.embed)
    assert cached == set() and gen_o.encoder_calls == 2
    np.testing.assert_allclose(out[1], gen_o.embed(vol[1:2])[0], rtol=2e-3, atol=1e-3)


# -- (c) every preprocessing field --------------------------------------------------------------------------
CHANGED = {
    # same input size and (pinned) precision and backend: only the variant differs
    "variant": ("sam", {"variant": "vit_b", "image_size": 64, "precision": "fp32", "encoder_backend": "eager"}),
    "image_size": ("sam", {"image_size": 128}),
    "preprocess": ("sam", {"preprocess": "medsam"}),
    "pixel_mean": ("sam", {"pixel_mean": [120.0, 116.28, 103.53]}),
    "pixel_std": ("sam", {"pixel_std": [58.395, 57.12, 50.0]}),
    "window_percentiles": ("sam", {"window_percentiles": [1.0, 99.0]}),
    "precision": ("sam", {"precision": "bf16"}),
    "encoder_backend": ("sam", {"encoder_backend": "compile"}),  # tiny resolves to eager on a CPU
    "checkpoint_sha256": ("arg", {"checkpoint_sha256": "f" * 64}),
    "slice_axis": ("arg", {"slice_axis": 2}),
    "cache_dtype": ("arg", {"cache_dtype": "float32"}),
}
BASE_ARGS = {"checkpoint_sha256": "0" * 64, "slice_axis": 0, "cache_dtype": "float16"}


def _fields(sam_changes: dict | None = None, arg_changes: dict | None = None) -> dict:
    cfg = SamConfig(**{"variant": "tiny", "checkpoint": "unused.pt", **(sam_changes or {})})
    return embedding_key_fields(resolve_sam_config(cfg, CPU), **{**BASE_ARGS, **(arg_changes or {})})


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_each_preprocessing_field_changes_the_key_and_misses(tmp_path, field):
    where, change = CHANGED[field]
    base = _fields()
    changed = _fields(change if where == "sam" else None, change if where == "arg" else None)
    assert {k for k in base if base[k] != changed[k]} == {field}
    assert cache_key(changed) != cache_key(base)
    vol = _volume()
    EmbeddingCache(tmp_path, cache_key(base), key_fields=base).get("case_a", vol, [0, 1], CountingEmbed())
    embed = CountingEmbed()
    _, cached = EmbeddingCache(tmp_path, cache_key(changed), key_fields=changed).get("case_a", vol, [0, 1], embed)
    assert cached == set() and embed.slices == 2
    embed_same = CountingEmbed()
    _, cached_same = EmbeddingCache(tmp_path, cache_key(base), key_fields=base).get("case_a", vol, [0, 1], embed_same)
    assert cached_same == {0, 1} and embed_same.slices == 0  # the unchanged key still hits


def test_every_sam_setting_is_in_the_key_or_left_out_on_purpose():
    """A new SamConfig field must be added to embedding_key_fields (or here, saying why it is not)."""
    left_out = {"checkpoint": "its bytes are hashed: checkpoint_sha256",
                "embed_batch_size": "how slices are grouped, not what is computed"}
    assert set(SamConfig.model_fields) - set(left_out) <= set(_fields())
    # settings that mean the same embedding give the same key
    assert _fields({"image_size": 64}) == _fields()  # tiny's own size, spelt out
    assert _fields({"embed_batch_size": 1}) == _fields()
    assert _fields({"precision": "fp32", "encoder_backend": "eager"}) == _fields()  # tiny's auto on a CPU


def test_the_key_refuses_an_unresolved_config():
    """auto means bf16 on one machine and fp32 on another: the key must hold what actually ran."""
    with pytest.raises(ValueError, match="resolve_sam_config"):
        embedding_key_fields(SamConfig(variant="tiny"), **BASE_ARGS)


# -- (d) a changed image -----------------------------------------------------------------------------------
def test_a_changed_image_is_detected_and_recomputed(tmp_path, tiny_sam_checkpoint, caplog):
    gen, cfg = _sam(tiny_sam_checkpoint)
    old_vol = _volume(seed=3)
    new_vol = old_vol.copy()
    new_vol[1, 10:20, 5:15] += 300.0  # same case id, shape and slice count; one slice's content changed
    cache = sam_embedding_cache(tmp_path, cfg, 0, "float16")
    stale, _ = cache.get("case_a", old_vol, [0, 1, 2], gen.embed)
    calls = gen.encoder_calls
    with caplog.at_level(logging.WARNING, logger="pipeline.generalist.cache"):
        out, cached = sam_embedding_cache(tmp_path, cfg, 0, "float16").get("case_a", new_vol, [0, 1, 2], gen.embed)
    assert cached == set() and gen.encoder_calls == calls + 3  # nothing of the old image is reused
    assert any("case_a" in r.getMessage() and "differs" in r.getMessage() for r in caplog.records)
    fresh = gen.embed(new_vol)
    for s in range(3):
        np.testing.assert_allclose(out[s], fresh[s], rtol=2e-3, atol=1e-3)
    assert not np.allclose(out[1], stale[1], atol=1e-2)
    # the new image's embeddings are now the cached ones for it
    again, hit = sam_embedding_cache(tmp_path, cfg, 0, "float16").get("case_a", new_vol, [0, 1, 2], CountingEmbed())
    assert hit == {0, 1, 2}
    np.testing.assert_array_equal(again[1], _as_stored(fresh[1]))
    # and the image hash is the slices' hash, recorded with the array
    arr_path = f"{cache.key}/case_a/{image_sha256(new_vol)[:NAME_HEX]}"
    arr = zarr.open_array(store=Location.of(tmp_path).zarr_store(), path=arr_path, mode="r")
    assert arr.attrs["image_sha256"] == image_sha256(new_vol) and arr.attrs["image_shape"] == [3, 40, 32]


def test_unmarked_or_damaged_slices_are_not_trusted(tmp_path, caplog):
    vol = _volume(s=4)
    cache = EmbeddingCache(tmp_path, "k")
    cache.get("case_a", vol, [0, 1, 2, 3], CountingEmbed())
    array_dir = tmp_path / "k" / "case_a" / image_sha256(vol)[:NAME_HEX]
    marks = sorted(os.listdir(array_dir / "done"))
    assert [m.split(".")[0] for m in marks] == ["0", "1", "2", "3"]
    (array_dir / "done" / marks[1]).unlink()  # a writer died between chunk and mark
    chunk = array_dir / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # a damaged chunk under a good mark
    embed = CountingEmbed()
    with caplog.at_level(logging.WARNING, logger="pipeline.generalist.cache"):
        out, cached = EmbeddingCache(tmp_path, "k").get("case_a", vol, [0, 1, 2, 3], embed)
    assert cached == {0, 3} and embed.slices == 2
    assert any("slice 2" in r.getMessage() for r in caplog.records)
    expected = CountingEmbed()(vol)
    for s in range(4):
        np.testing.assert_allclose(out[s], expected[s], rtol=2e-3, atol=1e-3)
    _, cached_after = EmbeddingCache(tmp_path, "k").get("case_a", vol, [0, 1, 2, 3], CountingEmbed())
    assert cached_after == {0, 1, 2, 3}


# -- (e) concurrent writers --------------------------------------------------------------------------------
def test_two_threads_writing_the_same_slices_at_once(tmp_path):
    """Both writers embed, then wait for each other, then create the array and write the same chunks."""
    vol = _volume(seed=5, s=8)
    fields = _fields()
    barrier = threading.Barrier(2)
    results: list = [None, None]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            cache = EmbeddingCache(tmp_path, cache_key(fields), key_fields=fields)
            results[i] = cache.get("case_a", vol, list(range(8)), CountingEmbed(barrier=barrier))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert all(r is not None and r[1] == set() for r in results)  # both really wrote every slice
    _assert_all_cached(tmp_path, cache_key(fields), fields, vol, "case_a")


def _fill(root: str, key: str, fields: dict, seed: int, start, out) -> None:
    """One writer process: fills case_a's slices in a random order of overlapping batches."""
    vol = _volume(seed=5, s=24)
    rng = np.random.default_rng(seed)
    start.wait(timeout=120)  # both processes imported and ready: their writes overlap
    hits = misses = 0
    for _ in range(6):
        cache = EmbeddingCache(root, key, key_fields=fields)  # a new run/actor each time
        wanted = sorted(rng.choice(24, size=10, replace=False).tolist())
        got, _ = cache.get("case_a", vol, wanted, CountingEmbed())
        expected = CountingEmbed()(vol[wanted])
        for s, e in zip(wanted, expected, strict=True):
            np.testing.assert_allclose(got[s], e, rtol=2e-3, atol=1e-3)
        hits, misses = hits + cache.hits, misses + cache.misses
    out.put((seed, hits, misses))


def test_two_processes_filling_one_case_leave_every_slice_right(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    fields = _fields()
    key = cache_key(fields)
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), key, fields, seed, start, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    counts = sorted(out.get(timeout=5) for _ in procs)
    assert all(h + m == 60 for _, h, m in counts)
    assert sum(m for _, _, m in counts) < 120  # they did share: later calls hit the other's slices
    vol = _volume(seed=5, s=24)
    written = sorted({int(n.split(".")[0]) for n in os.listdir(
        tmp_path / key / "case_a" / image_sha256(vol)[:NAME_HEX] / "done")})
    _assert_all_cached(tmp_path, key, fields, vol, "case_a", written)


def _assert_all_cached(root, key, fields, vol, case_id, slices=None) -> None:
    slices = list(range(len(vol))) if slices is None else slices
    embed = CountingEmbed()
    out, cached = EmbeddingCache(root, key, key_fields=fields).get(case_id, vol, slices, embed)
    assert cached == set(slices) and embed.slices == 0
    expected = CountingEmbed()(vol)
    for s in slices:
        np.testing.assert_array_equal(out[s], _as_stored(expected[s]))


# -- object storage -----------------------------------------------------------------------------------------
def test_shared_cache_on_s3(tmp_path):
    with moto_s3("sam-cache"):
        vol, fields = _volume(s=4), _fields()
        url = "s3://sam-cache/embeddings"
        first = EmbeddingCache(url, cache_key(fields), key_fields=fields)
        first.get("case_a", vol, [0, 1, 3], CountingEmbed())
        _assert_all_cached(url, cache_key(fields), fields, vol, "case_a", [0, 1, 3])
        changed = vol.copy()
        changed[0] += 1.0
        embed = CountingEmbed()
        _, cached = EmbeddingCache(url, cache_key(fields), key_fields=fields).get("case_a", changed, [0, 1], embed)
        assert cached == set() and embed.slices == 2


# -- (f) two runs share one cache_dir, end to end on Ray ---------------------------------------------------
@pytest.mark.ray
def test_two_runs_share_one_cache_dir(ray_cluster, synthetic_root, tiny_sam_checkpoint, tmp_path):
    cache_dir = tmp_path / "shared_cache"
    results = {}
    for name, seed in (("first", 0), ("second", 1)):
        tree = small_config_dict(synthetic_root, tmp_path / "runs", tiny_sam_checkpoint, name=name, seed=seed,
                                 rounds=2, workers={"sam": {"num_workers": 1, "num_cpus": 0.5, "torch_threads": 1}})
        tree["generalist"]["cache_dir"] = str(cache_dir)
        cfg = config_from_dict(tree)
        summaries, stats = run_with_stats(cfg)
        m = PseudoLabelStore(cfg.run_dir / "pseudo_labels").manifest(1)
        prompted = m[m["num_prompts"] > 0]
        results[name] = (cfg, summaries[1].relabel, stats, set(zip(prompted["case_id"], prompted["slice"], strict=True)))
        assert not (cfg.run_dir / "embeddings.zarr").exists()  # the cache is elsewhere

    _, r1, stats1, seen1 = results["first"]
    _, r2, stats2, seen2 = results["second"]
    assert r1["prompted_slices"] > 0 and r1["cached_slices"] == 0
    assert sum(s["encoder_calls"] for s in stats1) == len(seen1)
    shared = seen1 & seen2
    assert shared, "the two specialists prompted no slice in common: the test would prove nothing"
    assert r2["cached_slices"] == len(shared)  # every slice the first run embedded, the second read
    assert sum(s["encoder_calls"] for s in stats2) == len(seen2) - len(shared)
    assert sum(s["cache_hits"] for s in stats2) == len(shared)


# -- config ---------------------------------------------------------------------------------------------------
def test_cache_dir_resolves_like_the_other_paths(tmp_path, monkeypatch):
    conf = tmp_path / "project" / "conf"
    conf.mkdir(parents=True)
    (conf / "c.yaml").write_text(yaml.safe_dump({
        "data": {"root": "../data", "labeled": ["a"], "unlabeled": ["b"], "test": ["c"]},
        "generalist": {"cache_dir": "../sam-cache"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(conf / "c.yaml").generalist.cache_dir == str(tmp_path / "project" / "sam-cache")
    assert load_config(conf / "c.yaml", ["generalist.cache_dir=mine"]).generalist.cache_dir == str(elsewhere / "mine")
    assert load_config(conf / "c.yaml", ["generalist.cache_dir=s3://b/cache"]).generalist.cache_dir == "s3://b/cache"
    assert load_config(conf / "c.yaml", ["generalist.cache_dir=null"]).generalist.cache_dir is None


def test_an_unwritable_cache_dir_is_refused_before_any_work(tmp_path, synthetic_root, tiny_sam_checkpoint):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should go")
    tree = small_config_dict(synthetic_root, tmp_path / "runs", tiny_sam_checkpoint)
    tree["generalist"]["cache_dir"] = str(blocker / "cache")
    cfg = config_from_dict(tree)
    with pytest.raises(StoreError, match=r"cannot write to generalist\.cache_dir .*not-a-folder/cache"):
        preflight(cfg)
    assert not cfg.run_dir.exists()  # refused before the run folder was made
    # without pseudo-labels (or with the cache off) the cache is never used, so it is not checked
    tree["generalist"]["cache_embeddings"] = False
    preflight(config_from_dict(tree))


def test_runs_probing_one_shared_cache_dir_at_once_do_not_fail_each_other(tmp_path):
    """Every run's preflight probes the shared cache folder; with one fixed probe name, one run deleted the
    probe another was about to read back ('... does not exist') and the second run was refused."""
    shared = Location.of(str(tmp_path / "shared_cache"))
    errors: list[Exception] = []

    def probe_often():
        for _ in range(100):
            try:
                check_writable(shared, "generalist.cache_dir")
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(e)

    threads = [threading.Thread(target=probe_often) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list((tmp_path / "shared_cache").iterdir()) == []  # no probe left behind


# -- (f) issue 31: any unreadable entry is a miss, named once; fresh and cached numbers are the same ---------
def _filled(tmp_path, vol):
    cache = EmbeddingCache(tmp_path, "k")
    first, _ = cache.get("case_a", vol, list(range(len(vol))), CountingEmbed())
    return first, tmp_path / "k" / "case_a" / image_sha256(vol)[:NAME_HEX]


def _truncate_chunk(array_dir: Path) -> None:
    chunk = array_dir / "c" / "1" / "0" / "0" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(chunk.stat().st_size // 2)  # as `truncate -s`: a torn copy


def _drop_metadata(array_dir: Path) -> None:
    (array_dir / "zarr.json").unlink()


def _foreign_dtype(array_dir: Path) -> None:
    meta = (array_dir / "zarr.json").read_text().replace('"float16"', '"float32"')
    (array_dir / "zarr.json").write_text(meta)


def _garbled_metadata(array_dir: Path) -> None:
    (array_dir / "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')


@pytest.mark.parametrize("damage, recomputed", [(_truncate_chunk, 1), (_drop_metadata, 3), (_foreign_dtype, 3),
                                                (_garbled_metadata, 3)])
def test_an_unreadable_entry_is_a_miss_named_once_and_rewritten(tmp_path, caplog, damage, recomputed):
    vol = _volume(s=3)
    first, array_dir = _filled(tmp_path, vol)
    damage(array_dir)
    embed = CountingEmbed()
    with caplog.at_level(logging.WARNING, logger="pipeline.generalist.cache"):
        out, cached = EmbeddingCache(tmp_path, "k").get("case_a", vol, [0, 1, 2], embed)
    assert embed.slices == recomputed and len(cached) == 3 - recomputed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(array_dir) in warnings[0], warnings
    for s in range(3):
        np.testing.assert_array_equal(out[s], first[s])  # bit-identical to the run that filled the cache
    again = CountingEmbed()
    out2, cached2 = EmbeddingCache(tmp_path, "k").get("case_a", vol, [0, 1, 2], again)
    assert cached2 == {0, 1, 2} and again.slices == 0  # rewritten: whole again
    for s in range(3):
        np.testing.assert_array_equal(out2[s], first[s])


def test_fresh_and_cached_embeddings_are_the_same_numbers(tmp_path):
    vol = _volume(s=3) * 1.001  # values float16 cannot hold exactly
    fresh, cached = EmbeddingCache(tmp_path, "k").get("case_a", vol, [0, 1, 2], CountingEmbed())
    assert cached == set()
    again, cached = EmbeddingCache(tmp_path, "k").get("case_a", vol, [0, 1, 2], CountingEmbed())
    assert cached == {0, 1, 2}
    raw = CountingEmbed()(vol)
    assert any(not np.array_equal(raw[s], fresh[s]) for s in range(3))  # rounding did happen
    for s in range(3):
        assert fresh[s].dtype == np.float32 and np.array_equal(fresh[s], again[s])
