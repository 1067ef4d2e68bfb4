"""Exact values for pipeline.metrics: overlaps, spacing per axis, empty masks, and a brute-force cross-check."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from pipeline.errors import ConfigError
from pipeline.evaluation import METRICS, round_means
from pipeline.metrics import (
    average_surface_distance,
    case_metrics,
    dice,
    distance_unit,
    hausdorff_percentile,
    jaccard,
    metric_columns,
    summarize,
    surface_distances,
)

# --------------------------------------------------------------------------- helpers


def _box(shape: tuple[int, ...], *slices: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slices)] = True
    return mask


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background voxel among their 3**ndim - 1 neighbours (outside = background).

    Written with shifted copies of a zero-padded array, independently of binary_erosion.
    """
    padded = np.pad(mask, 1, constant_values=False)
    all_neighbours = np.ones_like(mask)
    for offset in np.ndindex(*(3,) * mask.ndim):
        window = tuple(slice(o, o + n) for o, n in zip(offset, mask.shape, strict=True))
        all_neighbours &= padded[window]
    return mask & ~all_neighbours


def _brute_distances(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    pa = np.argwhere(_brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


def _blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return field > 0.05


# --------------------------------------------------------------------------- Dice / Jaccard


def test_dice_jaccard_1d_known_overlap():
    a = _box((12,), slice(0, 6))  # 6 voxels
    b = _box((12,), slice(3, 10))  # 7 voxels, 3 shared
    assert dice(a, b) == pytest.approx(6 / 13)
    assert jaccard(a, b) == pytest.approx(3 / 10)


def test_dice_jaccard_2d_known_overlap_and_symmetry():
    a = _box((8, 8), slice(0, 4), slice(0, 5))  # 20 voxels
    b = _box((8, 8), slice(2, 5), slice(3, 6))  # 9 voxels; overlap rows 2-3, cols 3-4 -> 4
    assert dice(a, b) == pytest.approx(8 / 29)
    assert jaccard(a, b) == pytest.approx(4 / 25)
    assert dice(b, a) == dice(a, b)
    d = dice(a, b)
    assert jaccard(a, b) == pytest.approx(d / (2 - d))


def test_dice_accepts_label_like_arrays():
    a = np.array([0, 2, 2, 0])
    b = np.array([0, 1, 0, 0])
    assert dice(a, b) == pytest.approx(2 / 3)


def test_dice_jaccard_empty_rules():
    empty = np.zeros((4, 4), dtype=bool)
    full = _box((4, 4), slice(1, 3), slice(1, 3))
    assert dice(empty, empty) == 1.0
    assert jaccard(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0
    assert jaccard(empty, full) == 0.0


def test_disjoint_masks_have_zero_overlap_but_finite_distance():
    a = _box((10,), slice(0, 2))
    b = _box((10,), slice(7, 10))
    assert dice(a, b) == 0.0
    assert jaccard(a, b) == 0.0
    # 1D surface of [0, 2) is {0, 1}; of [7, 10) is {7, 8, 9}: max distance 9 - 1 = 8 (0 -> 7 is 7).
    assert hausdorff_percentile(a, b, (1.0,), percentile=100) == 8.0


# --------------------------------------------------------------------------- distances


def test_identical_masks():
    a = _box((10, 10, 10), slice(2, 7), slice(3, 8), slice(1, 5))
    assert dice(a, a) == 1.0
    assert jaccard(a, a) == 1.0
    assert hausdorff_percentile(a, a, (2.0, 1.0, 0.5)) == 0.0
    assert average_surface_distance(a, a, (2.0, 1.0, 0.5)) == 0.0


def test_cubes_offset_along_axis0_use_axis0_spacing():
    a = _box((14, 14, 14), slice(2, 7), slice(2, 7), slice(2, 7))
    b = _box((14, 14, 14), slice(5, 10), slice(2, 7), slice(2, 7))
    # The far faces (25 of each cube's 98 surface voxels) are 3 voxels * 2.0 mm from the other surface.
    assert hausdorff_percentile(a, b, (2.0, 1.0, 1.0)) == 6.0
    assert hausdorff_percentile(a, b, (2.0, 1.0, 1.0), percentile=100) == 6.0


def test_cubes_offset_along_axis1_use_axis1_spacing():
    a = _box((14, 14, 14), slice(2, 7), slice(2, 7), slice(2, 7))
    b = _box((14, 14, 14), slice(2, 7), slice(5, 10), slice(2, 7))
    assert hausdorff_percentile(a, b, (2.0, 1.0, 1.0)) == 3.0


def test_cube_surface_size_and_asd_value():
    a = _box((14, 14, 14), slice(2, 7), slice(2, 7), slice(2, 7))
    b = _box((14, 14, 14), slice(5, 10), slice(2, 7), slice(2, 7))
    d_ab, d_ba = surface_distances(a, b, (2.0, 1.0, 1.0))
    assert d_ab.shape == (98,) and d_ba.shape == (98,)  # 5**3 - 3**3
    brute_ab, brute_ba = _brute_distances(a, b, (2.0, 1.0, 1.0))
    expected = np.concatenate([brute_ab, brute_ba]).mean()
    assert average_surface_distance(a, b, (2.0, 1.0, 1.0)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected_mm"),
    [
        (0, (2.0, 1.0, 1.0), 8.0),
        (1, (2.0, 1.0, 1.0), 4.0),
        (2, (1.0, 1.0, 2.5), 10.0),
    ],
)
def test_single_voxels_four_apart(axis, spacing, expected_mm):
    a = np.zeros((12, 12, 12), dtype=bool)
    b = np.zeros_like(a)
    a[3, 3, 3] = True
    idx = [3, 3, 3]
    idx[axis] += 4
    b[tuple(idx)] = True
    assert hausdorff_percentile(a, b, spacing) == expected_mm
    assert average_surface_distance(a, b, spacing) == expected_mm
    d_ab, d_ba = surface_distances(a, b, spacing)
    np.testing.assert_array_equal(d_ab, [expected_mm])
    np.testing.assert_array_equal(d_ba, [expected_mm])


def test_anisotropic_spacing_follows_array_axis_order_2d():
    a = np.zeros((10, 10), dtype=bool)
    a[2, 2] = True
    down = np.zeros_like(a)
    down[6, 2] = True  # 4 voxels along axis 0
    right = np.zeros_like(a)
    right[2, 6] = True  # 4 voxels along axis 1
    spacing = (0.5, 3.0)
    assert hausdorff_percentile(a, down, spacing) == 2.0
    assert hausdorff_percentile(a, right, spacing) == 12.0
    diag = np.zeros_like(a)
    diag[5, 6] = True  # 3 along axis 0, 4 along axis 1
    assert hausdorff_percentile(a, diag, spacing) == pytest.approx(math.hypot(1.5, 12.0))


def test_empty_masks_give_nan_distances():
    empty = np.zeros((6, 6, 6), dtype=bool)
    cube = _box((6, 6, 6), slice(1, 4), slice(1, 4), slice(1, 4))
    sp = (1.0, 1.0, 1.0)
    for pred, ref in [(empty, cube), (cube, empty), (empty, empty)]:
        assert math.isnan(hausdorff_percentile(pred, ref, sp))
        assert math.isnan(average_surface_distance(pred, ref, sp))
        d_ab, d_ba = surface_distances(pred, ref, sp)
        assert d_ab.shape == (0,) and d_ba.shape == (0,)
    assert dice(empty, empty) == 1.0 and dice(empty, cube) == 0.0


def test_mask_filling_the_whole_array_has_its_border_as_surface():
    full = np.ones((5, 5), dtype=bool)
    point = np.zeros_like(full)
    point[2, 2] = True
    # Surface of the full array is its border ring; farthest ring voxel from the centre is a corner.
    d_full_point, d_point_full = surface_distances(full, point, (1.0, 1.0))
    assert d_full_point.shape == (16,)
    assert d_full_point.max() == pytest.approx(math.hypot(2, 2))
    np.testing.assert_array_equal(d_point_full, [2.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_asd_match_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (11, 13, 9)
    spacing = (1.5, 0.7, 2.0)
    a = _blob(rng, shape)
    b = _blob(rng, shape)
    assert a.any() and b.any() and (a != b).any()
    brute_ab, brute_ba = _brute_distances(a, b, spacing)
    union = np.concatenate([brute_ab, brute_ba])

    d_ab, d_ba = surface_distances(a, b, spacing)
    np.testing.assert_allclose(d_ab, brute_ab, atol=1e-9)
    np.testing.assert_allclose(d_ba, brute_ba, atol=1e-9)
    assert hausdorff_percentile(a, b, spacing) == pytest.approx(np.percentile(union, 95), abs=1e-9)
    assert hausdorff_percentile(a, b, spacing, 100) == pytest.approx(union.max(), abs=1e-9)
    assert average_surface_distance(a, b, spacing) == pytest.approx(union.mean(), abs=1e-9)


def test_small_blobs_inside_a_large_array_match_brute_force():
    # Exercises the bounding-box crop: blobs far from the array border, one touching it.
    rng = np.random.default_rng(7)
    a = np.zeros((30, 40, 20), dtype=bool)
    b = np.zeros_like(a)
    a[10:19, 5:15, 0:8] = _blob(rng, (9, 10, 8))
    b[12:20, 9:20, 3:11] = _blob(rng, (8, 11, 8))
    spacing = (0.9, 1.3, 3.0)
    brute_ab, brute_ba = _brute_distances(a, b, spacing)
    d_ab, d_ba = surface_distances(a, b, spacing)
    np.testing.assert_allclose(d_ab, brute_ab, atol=1e-9)
    np.testing.assert_allclose(d_ba, brute_ba, atol=1e-9)


def test_bad_spacing_and_percentile_raise():
    a = _box((5, 5), slice(1, 3), slice(1, 3))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, (1.0, 0.0))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff_percentile(a, a, (1.0, 1.0), percentile=101)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        surface_distances(np.zeros((4, 4), bool), np.zeros((4, 5), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(3, 4, 5\)"):
        case_metrics(np.zeros((3, 4, 4), int), np.zeros((3, 4, 5), int), (1.0, 1.0, 1.0), [1])


# --------------------------------------------------------------------------- case_metrics / summarize


def test_case_metrics_two_classes():
    ref = np.zeros((8, 8, 8), dtype=np.int64)
    ref[1:4, 1:4, 1:4] = 1  # 27 voxels
    ref[5:7, 5:7, 5:7] = 2  # 8 voxels
    pred = ref.copy()
    pred[1:4, 1:4, 1:2] = 0  # class 1 loses one 3x3 slab: 18 voxels left
    rows = case_metrics(pred, ref, (1.0, 1.0, 2.0), [1, 2])
    assert [r["class_id"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"class_id", "dice", "jaccard", "hd95_mm", "asd_mm", "pred_voxels", "ref_voxels"}
    r1, r2 = rows
    assert (r1["pred_voxels"], r1["ref_voxels"]) == (18, 27)
    assert r1["dice"] == pytest.approx(36 / 45)
    assert r1["jaccard"] == pytest.approx(18 / 27)
    assert r1["hd95_mm"] == 2.0  # the removed slab is one voxel of 2.0 mm along axis 2
    assert r2 == {
        "class_id": 2,
        "dice": 1.0,
        "jaccard": 1.0,
        "hd95_mm": 0.0,
        "asd_mm": 0.0,
        "pred_voxels": 8,
        "ref_voxels": 8,
    }


def test_case_metrics_missing_classes_and_percentile():
    ref = np.zeros((6, 6), dtype=np.int64)
    ref[1:3, 1:3] = 1
    pred = np.zeros_like(ref)
    rows = case_metrics(pred, ref, (1.0, 1.0), [1, 3], hd_percentile=50.0)
    missed, absent = rows
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95_mm"]) and math.isnan(missed["asd_mm"])
    assert absent["dice"] == 1.0 and absent["jaccard"] == 1.0 and math.isnan(absent["hd95_mm"])
    assert (absent["pred_voxels"], absent["ref_voxels"]) == (0, 0)

    # hd_percentile reaches hausdorff_percentile: median vs max on a known distance set.
    a = np.zeros((1, 10), dtype=np.int64)
    b = np.zeros_like(a)
    a[0, 0:5] = 1
    b[0, 0:9] = 1  # 1x5 row vs 1x9 row (every voxel is surface): d_ab all 0, d_ba = 0,0,0,0,0,1,2,3,4
    med = case_metrics(a, b, (1.0, 1.0), [1], hd_percentile=50.0)[0]["hd95_mm"]
    top = case_metrics(a, b, (1.0, 1.0), [1], hd_percentile=100.0)[0]["hd95_mm"]
    assert med == 0.0 and top == 4.0


def test_summarize_nan_means_and_mean_row():
    df = pd.DataFrame(
        [
            {"case_id": "a", "class_id": 1, "dice": 0.8, "jaccard": 0.6, "hd95_mm": 2.0, "asd_mm": 1.0},
            {"case_id": "b", "class_id": 1, "dice": 0.0, "jaccard": 0.0, "hd95_mm": np.nan, "asd_mm": np.nan},
            {"case_id": "a", "class_id": 2, "dice": 0.6, "jaccard": 0.4, "hd95_mm": 4.0, "asd_mm": 3.0},
            {"case_id": "b", "class_id": 2, "dice": 1.0, "jaccard": 1.0, "hd95_mm": 6.0, "asd_mm": 1.0},
        ]
    )
    out = summarize(df)
    assert list(out.columns) == ["class_id", "dice", "jaccard", "hd95_mm", "asd_mm", "n", "n_nan_distance"]
    assert out["class_id"].tolist() == [1, 2, -1]
    c1, c2, mean = (out.iloc[i] for i in range(3))
    assert c1["dice"] == pytest.approx(0.4)  # a missed structure still counts in Dice
    assert c1["hd95_mm"] == pytest.approx(2.0)  # ... but drops out of the distance nan-mean
    assert (c1["n"], c1["n_nan_distance"]) == (2, 1)
    assert c2["hd95_mm"] == pytest.approx(5.0) and c2["asd_mm"] == pytest.approx(2.0)
    assert mean["dice"] == pytest.approx((0.4 + 0.8) / 2)
    assert mean["hd95_mm"] == pytest.approx((2.0 + 5.0) / 2)
    assert (mean["n"], mean["n_nan_distance"]) == (4, 1)


def test_summarize_all_nan_class_stays_nan_and_bad_table_raises():
    df = pd.DataFrame(case_metrics(np.zeros((4, 4), int), np.ones((4, 4), int), (1.0, 1.0), [1]))
    out = summarize(df)
    assert math.isnan(out.loc[0, "hd95_mm"]) and math.isnan(out.loc[1, "hd95_mm"])
    assert out.loc[1, "dice"] == 0.0
    with pytest.raises(ValueError, match="hd95_mm"):
        summarize(df.drop(columns=["hd95_mm"]))


# --------------------------------------------------------------------------- units and NaN counts


def test_case_metrics_without_spacing_reports_voxels_never_mm():
    ref = np.zeros((8, 8, 8), dtype=np.int64)
    ref[1:4, 1:4, 1:4] = 1
    pred = ref.copy()
    pred[1:4, 1:4, 1:2] = 0
    vox = case_metrics(pred, ref, None, [1])[0]
    assert set(vox) == {"class_id", "dice", "jaccard", "hd95_vox", "asd_vox", "pred_voxels", "ref_voxels"}
    assert vox["hd95_vox"] == 1.0  # one voxel step, whatever its size in mm
    mm = case_metrics(pred, ref, (1.0, 1.0, 2.0), [1])[0]
    assert mm["hd95_mm"] == 2.0 and "hd95_vox" not in mm
    assert distance_unit(vox) == "vox" and distance_unit(mm) == "mm"
    assert metric_columns("vox") == ("dice", "jaccard", "hd95_vox", "asd_vox")
    with pytest.raises(ValueError, match="hd95_mm or hd95_vox"):
        distance_unit(["dice", "hd95_mm", "hd95_vox"])
    out = summarize(pd.DataFrame(case_metrics(pred, ref, None, [1])))
    assert list(out.columns) == ["class_id", "dice", "jaccard", "hd95_vox", "asd_vox", "n", "n_nan_distance"]


def _eval_table(unit: str) -> pd.DataFrame:
    return pd.DataFrame({"case_id": ["a", "a", "b", "b", "c", "c"], "class_id": [1, 2, 1, 2, 1, 2],
                         "dice": [0.8, 0.6, 0.0, 0.2, 1.0, 0.4], "jaccard": [0.6, 0.4, 0.0, 0.1, 1.0, 0.3],
                         f"hd95_{unit}": [1.0, 3.0, np.nan, 5.0, np.nan, 7.0],
                         f"asd_{unit}": [1.0, 1.0, np.nan, 2.0, np.nan, 3.0]})


def test_round_means_counts_nan_pairs_and_keeps_the_unit():
    m = round_means(_eval_table("vox"), per_class=METRICS)
    assert m["hd95_vox"] == pytest.approx((1 + 3 + 5 + 7) / 4) and "hd95_mm" not in m
    assert (m["hd95_nan"], m["asd_nan"], m["pairs"]) == (2, 2, 6)
    assert m["hd95_vox_class1"] == pytest.approx(1.0) and m["dice_class2"] == pytest.approx(0.4)
    mm = round_means(_eval_table("mm"))
    assert mm["asd_mm"] == pytest.approx(7 / 4) and mm["hd95_nan"] == 2 and set(mm) >= {"dice_class1", "dice_class2"}


def test_eval_table_and_round_line_name_the_unit(tmp_path):
    from pipeline.reports import eval_frame, eval_table
    from pipeline.round_summary import RoundSummary

    (tmp_path / "eval").mkdir()
    df = _eval_table("vox")
    df.insert(0, "round", 0)
    df.to_parquet(tmp_path / "eval" / "round_000.parquet", index=False)
    text = eval_table(tmp_path)
    assert text.splitlines()[0] == "distances in voxels (no voxel spacing known)" and " mm" not in text
    frame = eval_frame(tmp_path)
    assert {"hd95_vox", "asd_vox", "hd95_nan", "pairs"} <= set(frame.columns) and frame["hd95_nan"][0] == 2
    line = RoundSummary(round=0, seconds=1.0, train={"loss": 0.5}, test=round_means(df)).line()
    assert "HD95 4.00 vox ASD 1.75 vox (2/6 pairs without distance)" in line and "mm" not in line
    line_mm = RoundSummary(round=0, seconds=1.0, test=round_means(_eval_table("mm"))).line()
    assert "HD95 4.00 mm ASD 1.75 mm" in line_mm


def test_h5_distances_are_in_voxels_unless_a_spacing_is_given(tmp_path):
    import h5py
    import torch

    from pipeline.data.dataset import load_image, load_label, read_dataset_info
    from pipeline.data.synthetic import write_synthetic_h5, write_synthetic_msd
    from pipeline.evaluation import EvalVolume, distance_spacing, evaluate_model
    from pipeline.models.unet import build_model, model_args
    from tests.conftest import small_config

    root = write_synthetic_h5(tmp_path / "h5", num_cases=4, shape=(16, 20, 18), seed=2)
    info = read_dataset_info(root, "h5")
    vols = [EvalVolume(c, *load_image(info, c)[:1], load_label(info, c), load_image(info, c)[1])
            for c in ["case_000", "case_001"]]
    assert vols[0].spacing == (1.0, 1.0, 1.0)  # what the loader falls back to: not to be called mm

    def cfg(**data):
        return small_config(root, tmp_path / "run", data={"format": "h5", "split_file": None, "num_labeled": None,
                                                          "labeled": ["case_002"], "unlabeled": ["case_003"],
                                                          "test": ["case_000", "case_001"], **data})

    assert distance_spacing(cfg().data, vols) == {"case_000": None, "case_001": None}
    assert distance_spacing(cfg(spacing=[0.5, 0.6, 2.0]).data, vols)["case_001"] == (0.5, 0.6, 2.0)
    model = build_model(model_args(cfg().model, info.num_classes))
    df = evaluate_model(model, vols, cfg(), [1, 2], torch.device("cpu"))
    assert {"hd95_vox", "asd_vox"} <= set(df.columns) and not any(c.endswith("_mm") for c in df.columns)
    assert {"hd95_mm", "asd_mm"} <= set(evaluate_model(model, vols, cfg(spacing=[1, 1, 2]), [1, 2],
                                                       torch.device("cpu")).columns)
    # a spacing attribute in a file, or a spacing list in dataset.json, counts as known
    with h5py.File(root / "case_001.h5", "r+") as f:
        f.attrs["spacing"] = [0.7, 0.7, 3.0]
    assert distance_spacing(cfg().data, vols) == {"case_000": None, "case_001": (1.0, 1.0, 1.0)}
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "spacing": [0.9, 0.9, 1.5]}))
    assert set(distance_spacing(cfg().data, vols).values()) == {(0.9, 0.9, 1.5)}
    # MSD: the NIfTI header's spacing; data.spacing is refused there
    msd = write_synthetic_msd(tmp_path / "msd", num_cases=4, shape=(16, 20, 18), seed=2)
    msd_info = read_dataset_info(msd, "msd")
    image, spacing = load_image(msd_info, "case_000")
    msd_cfg = small_config(msd, tmp_path / "run", data={"format": "msd"})
    assert distance_spacing(msd_cfg.data, [EvalVolume("case_000", image, image, spacing)]) == {"case_000": spacing}
    with pytest.raises(ConfigError, match="data.spacing is for h5"):
        small_config(msd, tmp_path / "run", data={"format": "msd", "spacing": [1, 1, 1]})


def test_eval_table_and_plot_name_the_classes(tmp_path):
    """Issue 18: results said class1/2/3 when dataset.json names RV/MYO/LV."""
    from pipeline.eval_plots import write_eval_plots
    from pipeline.reports import eval_table

    (tmp_path / "eval").mkdir()
    df = _eval_table("mm")
    df.insert(0, "round", 0)
    df.insert(2, "class_name", df["class_id"].map({1: "RV", 2: "LV"}))
    df.to_parquet(tmp_path / "eval" / "round_000.parquet", index=False)
    header = eval_table(tmp_path).splitlines()[1].split()
    assert "dice_RV" in header and "dice_LV" in header and "dice_class1" not in header
    plot = write_eval_plots(tmp_path, tmp_path / "png")
    assert plot.path.is_file()
    legacy = _eval_table("mm")  # a table written before class names were recorded
    legacy.insert(0, "round", 1)
    legacy.to_parquet(tmp_path / "eval" / "round_001.parquet", index=False)
    assert "dice_RV" in eval_table(tmp_path)  # the names recorded in round 0 still apply
