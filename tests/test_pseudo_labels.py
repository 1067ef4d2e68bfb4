"""Loading stored pseudo-labels for training: volume axis order, the score gate, the consensus gate, the
gate to the voxels that classes taken from the generalist decide."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.store import MANIFEST_COLUMNS, PseudoLabelStore
from pipeline.training.pseudo_labels import generalist_classes_by_case, load_pseudo_labels, slice_scores


@pytest.fixture
def store(tmp_path):
    """One case of 3 slices (4 x 5), slice-first as stored; slice 0 scored 0.9, slice 1 scored 0.2,
    slice 2 unprompted. The pseudo-label differs from the specialist on 2 voxels of slice 0."""
    s = PseudoLabelStore(tmp_path / "pl", create=True, class_ids=[1, 2], slice_axis=2)
    s.ensure_round(1, 0, "classical")
    specialist = np.zeros((3, 4, 5), np.uint8)
    specialist[0, 1:3, 1:4] = 1
    specialist[1, 0:2, 0:2] = 2
    pseudo = specialist.copy()
    pseudo[0, 1, 1] = 0   # generalist removes a voxel
    pseudo[0, 3, 4] = 2   # and adds one
    scores = np.array([[0.9, np.nan], [np.nan, 0.2], [np.nan, np.nan]], np.float32)
    s.write_case(1, "case_a", pseudo, specialist, scores, {})
    return s, pseudo, specialist


def test_slice_scores_mean_over_prompted_classes():
    out = slice_scores(np.array([[0.9, 0.5], [np.nan, 0.2], [np.nan, np.nan]], np.float32))
    np.testing.assert_allclose(out[:2], [0.7, 0.2], rtol=1e-6)
    assert np.isnan(out[2])


def test_volume_order_and_score_gate(store):
    s, pseudo, _ = store
    pl = load_pseudo_labels(s, 1, ["case_a"], slice_axis=2, min_score=0.5)["case_a"]
    assert pl.labels.shape == (4, 5, 3)                       # slices back on axis 2
    np.testing.assert_array_equal(pl.labels[..., 0], pseudo[0])
    np.testing.assert_array_equal(pl.slice_weight, [1.0, 0.0, 1.0])  # low score dropped, unprompted kept
    assert pl.voxel_weight is None
    w = pl.weight(pl.labels.shape, 2)
    assert w.shape == (4, 5, 3) and (w[..., 1] == 0).all() and (w[..., [0, 2]] == 1).all()


def test_consensus_gate_drops_voxels_where_generalist_and_specialist_differ(store):
    s, pseudo, specialist = store
    pl = load_pseudo_labels(s, 1, ["case_a"], slice_axis=2, min_score=0.0, consensus_only=True)["case_a"]
    expected = np.moveaxis(pseudo == specialist, 0, 2)
    np.testing.assert_array_equal(pl.voxel_weight, expected)
    w = pl.weight(pl.labels.shape, 2)
    assert w.sum() == 3 * 4 * 5 - 2
    assert w[1, 1, 0] == 0 and w[3, 4, 0] == 0 and w[1, 2, 0] == 1


def test_an_empty_mask_never_passes_the_score_gate(tmp_path):
    """Issue 18: a prompted class whose mask came back empty scored 0.59 and passed a 0.5 gate."""
    from pipeline.store import PseudoLabelStore
    from pipeline.training.pseudo_labels import empty_prompted, load_pseudo_labels

    pl = np.zeros((3, 4, 4), np.uint8)
    pl[0, 1, 1] = 1          # slice 0: class 1 prompted and found
    pl[1, 2, 2] = 2          # slice 1: class 1 prompted, its mask empty (class 2 not prompted)
    scores = np.array([[0.9, np.nan], [0.59, np.nan], [np.nan, np.nan]], np.float32)  # slice 2: no prompt
    assert empty_prompted(pl, scores, [1, 2]).tolist() == [False, True, False]
    store = PseudoLabelStore(tmp_path / "pl", create=True, class_ids=[1, 2])
    store.ensure_round(1, 0, "g")
    store.write_case(1, "c1", pl, pl.copy(), scores, {})
    gated = load_pseudo_labels(store, 1, ["c1"], 0, 0.5)["c1"]
    assert gated.slice_weight.tolist() == [1.0, 0.0, 1.0]


def _manifest_rows(case_id: str, n_slices: int, class_source: str) -> pd.DataFrame:
    """Manifest rows of one case in round 1 with this ``class_source`` JSON (the other columns filler)."""
    filler = {"object": "", "int32": 0, "float64": 0.0, "bool": False}
    rows = [{c: filler[t] for c, t in MANIFEST_COLUMNS.items()} | {
        "round": 1, "case_id": case_id, "slice": i, "trained_in_round": 1, "class_source": class_source}
        for i in range(n_slices)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("class_source", "generalist_classes"), [
    ('{"1":"generalist","2":"specialist"}', [1]),
    ('{"1":"specialist","2":"specialist"}', []),
    ("{}", [1, 2]),  # parts written before per-class sources: every class from the generalist
])
def test_generalist_voxels_only_keeps_what_the_generalists_classes_decide(store, class_source, generalist_classes):
    """Voxels that are a generalist class in the pseudo-label or in the specialist prediction keep their
    weight; every other voxel (a specialist class's, or background that no generalist class touches) is
    dropped, so classes taken from the specialist add no self-training on its own prediction."""
    s, pseudo, specialist = store
    s.append_manifest(_manifest_rows("case_a", 3, class_source))
    assert generalist_classes_by_case(s, 1) == {"case_a": generalist_classes}
    pl = load_pseudo_labels(s, 1, ["case_a"], slice_axis=2, min_score=0.0, generalist_voxels_only=True)["case_a"]
    decided = np.isin(pseudo, generalist_classes) | np.isin(specialist, generalist_classes)
    np.testing.assert_array_equal(pl.voxel_weight, np.moveaxis(decided, 0, 2))
    w = pl.weight(pl.labels.shape, 2)
    if generalist_classes == [1]:
        # slice 0: the specialist's 6 class-1 voxels (one of them removed by the generalist) are kept; the
        # voxel the generalist made class 2 and slice 1's class-2 voxels (a specialist class) are not
        assert w[..., 0].sum() == 6 and w[1, 1, 0] == 1 and w[3, 4, 0] == 0 and w[..., 1].sum() == 0
    if not generalist_classes:
        assert w.sum() == 0  # every class from the specialist: the case adds nothing to the term
    plain = load_pseudo_labels(s, 1, ["case_a"], slice_axis=2, min_score=0.0)["case_a"]
    assert plain.voxel_weight is None  # the gate is off by default
