"""The pseudo-label store: real Zarr v3 arrays and a real Parquet manifest in tmp_path."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

import fastparquet
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError, StoreError
from pipeline.store import MANIFEST_COLUMNS, PseudoLabelStore, open_manifest, open_masks

CLASS_IDS = [1, 2]


def _arrays(seed: int, s: int = 4, h: int = 6, w: int = 5):
    rng = np.random.default_rng(seed)
    pseudo = rng.integers(0, 3, size=(s, h, w), dtype=np.uint8)
    spec = rng.integers(0, 3, size=(s, h, w), dtype=np.uint8)
    scores = rng.random((s, len(CLASS_IDS))).astype(np.float32)
    scores[0, 1] = np.nan  # a class that was not prompted on slice 0
    return pseudo, spec, scores


def _rows(round_index: int, case_id: str, n: int, score: float = 0.5) -> list[dict]:
    return [{
        "round": round_index, "case_id": case_id, "slice": s, "checkpoint_version": 3,
        "generalist": "sam-tiny", "num_prompts": 1, "prompts": json.dumps([{"class_id": 1}]),
        "score_mean": score, "scores": json.dumps({"1": score}), "pseudo_fg_fraction": 0.1,
        "specialist_fg_fraction": 0.2, "agreement_dice": 0.9, "embedding_cached": bool(s % 2),
    } for s in range(n)]


@pytest.fixture
def store(tmp_path):
    st = PseudoLabelStore(tmp_path / "store", create=True, class_ids=CLASS_IDS, slice_axis=2)
    st.ensure_round(1, checkpoint_version=3, generalist="sam-tiny")
    return st


def test_round_trip_arrays_and_attrs(store, tmp_path):
    pseudo, spec, scores = _arrays(0)
    store.write_case(1, "case_001", pseudo, spec, scores, {"checkpoint_version": 3, "generalist": "sam-tiny"})
    # a fresh read-only handle on the folder sees the same data
    reopened = PseudoLabelStore(tmp_path / "store")
    assert reopened.class_ids == CLASS_IDS and reopened.slice_axis == 2
    assert reopened.rounds() == [1]
    got = reopened.read_case(1, "case_001")
    np.testing.assert_array_equal(got["pseudo_label"], pseudo)
    np.testing.assert_array_equal(got["specialist"], spec)
    np.testing.assert_array_equal(got["scores"], scores)  # NaN compares equal here
    assert got["pseudo_label"].dtype == np.uint8 and got["scores"].dtype == np.float32
    a = got["attrs"]
    assert a["round"] == 1 and a["checkpoint_version"] == 3 and a["generalist"] == "sam-tiny"
    assert a["case_id"] == "case_001"
    written = dt.datetime.fromisoformat(a["written_at"])
    assert abs((dt.datetime.now(dt.timezone.utc) - written).total_seconds()) < 120


def test_write_before_ensure_round_raises(store):
    pseudo, spec, scores = _arrays(0)
    with pytest.raises(StoreError, match="round 2 was not created"):
        store.write_case(2, "case_001", pseudo, spec, scores, {})


def test_not_a_store_names_path(tmp_path):
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    with pytest.raises(StoreError, match="not a pseudo-label store") as e:
        PseudoLabelStore(folder)
    assert str(folder) in str(e.value)
    assert not (folder / "masks.zarr").exists()  # reading never creates anything


def test_rewrite_replaces_arrays_and_rows(store):
    p1, s1, sc1 = _arrays(1)
    store.write_case(1, "case_a", p1, s1, sc1, {})
    store.write_case(1, "case_b", *_arrays(2), {})
    store.append_manifest(_rows(1, "case_a", 4, score=0.1) + _rows(1, "case_b", 4, score=0.2))
    # rerun case_a with new values and fewer rows
    p2, s2, sc2 = _arrays(9)
    assert not np.array_equal(p1, p2)
    store.write_case(1, "case_a", p2, s2, sc2, {})
    store.append_manifest(_rows(1, "case_a", 3, score=0.7), replace=True)
    got = store.read_case(1, "case_a")
    np.testing.assert_array_equal(got["pseudo_label"], p2)
    np.testing.assert_array_equal(got["specialist"], s2)
    np.testing.assert_array_equal(got["scores"], sc2)
    m = store.manifest()
    a = m[(m["round"] == 1) & (m["case_id"] == "case_a")]
    assert len(a) == 3
    assert sorted(a["slice"]) == [0, 1, 2]
    assert np.allclose(a["score_mean"], 0.7)
    b = m[m["case_id"] == "case_b"]
    assert len(b) == 4 and np.allclose(b["score_mean"], 0.2)  # other cases untouched
    assert len(m) == 7
    assert store.completed_cases(1) == {"case_a", "case_b"}


def test_rewrite_with_different_shape_replaces_arrays(store):
    store.write_case(1, "case_a", *_arrays(1, s=4), {})
    p2, s2, sc2 = _arrays(2, s=2, h=3, w=3)
    store.write_case(1, "case_a", p2, s2, sc2, {})
    got = store.read_case(1, "case_a")
    assert got["pseudo_label"].shape == (2, 3, 3)
    np.testing.assert_array_equal(got["pseudo_label"], p2)


def test_append_new_case_keeps_old_rows_and_dtypes(store):
    store.append_manifest(_rows(1, "case_a", 4))
    first = store.parts()
    before = first[0].read_bytes()
    store.append_manifest(_rows(1, "case_b", 2))  # a new part; the first is neither read nor rewritten
    parts = store.parts()
    assert len(parts) == 2 and parts[0] == first[0] and parts[0].read_bytes() == before
    pf = fastparquet.ParquetFile(str(parts[1]))
    m = store.manifest()
    assert len(m) == 6
    assert dict(pf.dtypes) == {c: np.dtype(t) for c, t in MANIFEST_COLUMNS.items()}  # the file's schema
    assert list(m.columns) == list(MANIFEST_COLUMNS)
    for c, t in MANIFEST_COLUMNS.items():  # pandas 3 reads the object (string) columns back as str
        if t == "object":
            assert pd.api.types.is_string_dtype(m[c]), (c, m[c].dtype)
        else:
            assert m[c].dtype == np.dtype(t), (c, m[c].dtype)
    assert list(m["case_id"]) == ["case_a"] * 4 + ["case_b"] * 2
    assert list(m["embedding_cached"]) == [False, True, False, True, False, True]
    assert store.completed_cases(1) == {"case_a", "case_b"}
    assert store.completed_cases(2) == set()


def test_bad_manifest_row_leaves_file_intact(store):
    store.append_manifest(_rows(1, "case_a", 3))

    def snapshot():
        return {p.name: p.read_bytes() for p in store.parts()}

    before = snapshot()
    bad = _rows(1, "case_b", 2)
    del bad[1]["agreement_dice"]
    with pytest.raises(StoreError, match="agreement_dice"):
        store.append_manifest(bad)
    assert snapshot() == before
    extra = _rows(1, "case_b", 1)
    extra[0]["surprise"] = 1
    with pytest.raises(StoreError, match="surprise"):
        store.append_manifest(extra)
    assert snapshot() == before
    no_slice = _rows(1, "case_a", 2)  # would replace case_a's rows if it got through
    del no_slice[0]["slice"]
    with pytest.raises(StoreError, match="slice"):
        store.append_manifest(no_slice)
    assert snapshot() == before
    frame = pd.DataFrame(_rows(1, "case_b", 2)).drop(columns=["generalist"])
    with pytest.raises(StoreError, match="generalist"):
        store.append_manifest(frame)
    assert snapshot() == before
    assert len(store.manifest()) == 3
    assert [n for n in store.manifest_loc.list_names() if n.startswith(".")] == []


def test_empty_manifest_has_columns(store):
    m = store.manifest()
    assert m.empty and list(m.columns) == list(MANIFEST_COLUMNS)
    with pytest.raises(StoreError, match="no manifest parts"):
        open_manifest(store.root)


def test_dask_views(store):
    written = {c: _arrays(i) for i, c in enumerate(["case_a", "case_b", "case_c"])}
    for c, (p, s, sc) in written.items():
        store.write_case(1, c, p, s, sc, {})
    store.append_manifest(_rows(1, "case_a", 4) + _rows(1, "case_b", 4))
    store.append_manifest(_rows(1, "case_c", 4))
    masks = open_masks(store.root, 1)
    assert sorted(masks) == sorted(written)
    for c, arr in masks.items():
        assert type(arr).__module__.startswith("dask.array")
        assert arr.chunks == tuple((n,) for n in arr.shape)  # one chunk per case, one writer
        np.testing.assert_array_equal(arr.compute(), written[c][0])
    spec = open_masks(store.root, 1, "specialist")
    np.testing.assert_array_equal(spec["case_b"].compute(), written["case_b"][1])
    with pytest.raises(StoreError, match="no round 5"):
        open_masks(store.root, 5)
    ddf = open_manifest(store.root)
    assert type(ddf).__module__.startswith("dask")
    df = ddf.compute()
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 12
    assert sorted(df["case_id"].unique()) == ["case_a", "case_b", "case_c"]


def test_concurrent_writers_one_array_each(store):
    cases = {f"w{w}_c{c}": _arrays(10 * w + c, s=5, h=8, w=7) for w in range(4) for c in range(3)}

    def writer(w: int) -> None:
        for c in range(3):
            cid = f"w{w}_c{c}"
            store.write_case(1, cid, *cases[cid], {"writer": w})

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(writer, range(4)))
    reader = PseudoLabelStore(store.root)
    for cid, (p, s, sc) in cases.items():
        got = reader.read_case(1, cid)
        np.testing.assert_array_equal(got["pseudo_label"], p)
        np.testing.assert_array_equal(got["specialist"], s)
        np.testing.assert_array_equal(got["scores"], sc)
        assert got["attrs"]["writer"] == int(cid[1])
    assert sorted(open_masks(store.root, 1)) == sorted(cases)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden"])
def test_unsafe_case_id_refused(store, bad):
    with pytest.raises(ConfigError):
        store.write_case(1, bad, *_arrays(0), {})
    with pytest.raises(ConfigError):
        store.read_case(1, bad)
    assert not (store.root.parent / "evil").exists()


def test_missing_case_names_case_and_round(store):
    store.write_case(1, "case_a", *_arrays(0), {})
    with pytest.raises(StoreError) as e:
        store.read_case(1, "case_zz")
    assert "case_zz" in str(e.value) and "round 1" in str(e.value)
    with pytest.raises(StoreError, match="round 4"):
        store.read_case(4, "case_a")


def test_case_status_sees_a_deleted_array_and_an_all_background_case(store):
    pseudo, spec, scores = _arrays(0)
    store.write_case(1, "case_a", pseudo, spec, scores, {})
    store.write_case(1, "empty", np.zeros_like(pseudo), np.zeros_like(spec), scores, {})  # all fill value
    store.write_case(1, "case_b", pseudo, spec, scores, {})
    import shutil

    shutil.rmtree(store.root.path + "/masks.zarr/round_001/case_b/pseudo_label")
    assert store.case_status(1) == {"case_a": True, "empty": True, "case_b": False}
    with pytest.raises(StoreError, match="case_b"):
        store.read_case(1, "case_b")


def test_remove_cases_rewrites_only_their_parts(store):
    store.append_manifest(_rows(1, "case_a", 2) + _rows(1, "case_b", 3))
    store.append_manifest(_rows(1, "case_c", 4))
    untouched = store.parts()[1]
    assert store.remove_cases(1, {"case_a"}) == 2
    m = store.manifest()
    assert sorted(m["case_id"].unique()) == ["case_b", "case_c"] and len(m) == 7
    assert untouched in store.parts()
    assert store.completed_cases(1) == {"case_b", "case_c"}


def test_damaged_part_is_named(store):
    store.append_manifest(_rows(1, "case_a", 2))
    part = store.parts()[0]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as e:
        store.manifest()
    assert part.name in str(e.value) and "damaged" in str(e.value)
