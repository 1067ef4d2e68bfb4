"""Prompts from the specialist's prediction (pipeline.prompts) and per-slice windowing, with exact values.

Rectangles are non-square and off-centre so that a (row, col) / (x, y) swap fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import PromptConfig
from pipeline.generalist.windowing import to_sam_rgb, window_to_uint8
from pipeline.prompts import interior_point, largest_component, prompts_for_slice, summarize_prompts

H, W = 48, 64
R0, R1, C0, C1 = 10, 19, 30, 49  # the class-1 rectangle: rows 10..19, cols 30..49 (inclusive)


def _rect_pred(cls: int = 1) -> np.ndarray:
    pred = np.zeros((H, W), dtype=np.int64)
    pred[R0:R1 + 1, C0:C1 + 1] = cls
    return pred


def _cfg(**kw) -> PromptConfig:
    return PromptConfig(**kw)


def _pos_neg(p):
    pos = p.points_xy[p.point_labels == 1]
    neg = p.points_xy[p.point_labels == 0]
    return pos, neg


def _at(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """mask values at points (x, y) -> mask[y, x]."""
    xy = np.asarray(xy).astype(int)
    return mask[xy[:, 1], xy[:, 0]]


# --------------------------------------------------------------------------- components / interior


def test_largest_component_uses_8_connectivity_and_handles_empty():
    m = np.zeros((10, 12), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True  # a diagonal line: one 8-connected component of 3 px
    m[6:8, 8:10] = True  # a 2x2 block: 4 px
    out = largest_component(m)
    assert out.dtype == bool and out.shape == m.shape
    assert out.sum() == 4 and out[6:8, 8:10].all()
    m[4, 4] = m[5, 5] = m[6, 6] = True  # the diagonal grows to 6 px; (6, 6) does not touch the block (cols 8..9)
    out = largest_component(m)
    assert out.sum() == 6 and out[3, 3] and not out[6:8, 8:10].any()
    assert not largest_component(np.zeros((5, 5), bool)).any()


def test_interior_point_is_row_col_of_the_edt_maximum():
    pred = _rect_pred()
    # The EDT of a 10 x 20 rectangle peaks at 5 on rows 14 and 15, cols 34..45; first in argwhere order.
    assert interior_point(pred == 1) == (14, 34)
    assert interior_point(np.zeros((4, 4), bool)) is None
    single = np.zeros((5, 7), bool)
    single[3, 5] = True
    assert interior_point(single) == (3, 5)


def test_interior_point_treats_outside_the_slice_as_background():
    m = np.zeros((20, 30), bool)
    m[0:6, 0:20] = True  # touches the top and left border
    r, c = interior_point(m)
    assert 2 <= r <= 3 and 2 <= c <= 17


# --------------------------------------------------------------------------- prompts_for_slice


@pytest.mark.parametrize("margin", [0, 2, 3])
def test_box_is_xyxy_inclusive_with_margin(margin):
    (p,) = prompts_for_slice(_rect_pred(), [1], _cfg(box_margin=margin), np.random.default_rng(0))
    assert p.class_id == 1
    assert p.box_xyxy.dtype == np.float32 and p.box_xyxy.shape == (4,)
    assert p.box_xyxy.tolist() == [C0 - margin, R0 - margin, C1 + margin, R1 + margin]


def test_box_is_clipped_to_the_slice():
    pred = np.zeros((H, W), np.int64)
    pred[0:5, W - 8:W] = 2
    (p,) = prompts_for_slice(pred, [2], _cfg(box_margin=4), np.random.default_rng(0))
    assert p.box_xyxy.tolist() == [W - 12, 0, W - 1, 8]


def test_no_box_when_disabled():
    (p,) = prompts_for_slice(_rect_pred(), [1], _cfg(use_box=False), np.random.default_rng(0))
    assert p.box_xyxy is None


def test_points_are_xy_positives_inside_negatives_outside_and_in_box():
    pred = _rect_pred()
    cfg = _cfg(num_random_positive=5, num_negative=6, box_margin=3)
    (p,) = prompts_for_slice(pred, [1], cfg, np.random.default_rng(1))
    assert p.points_xy.dtype == np.float32 and p.points_xy.shape == (12, 2)
    assert p.point_labels.dtype == np.int32
    assert p.point_labels.tolist() == [1] * 6 + [0] * 6
    pos, neg = _pos_neg(p)
    # The first positive is the interior point (row 14, col 34) as (x, y).
    assert pos[0].tolist() == [34.0, 14.0]
    assert np.all((pos[:, 0] >= C0) & (pos[:, 0] <= C1)) and np.all((pos[:, 1] >= R0) & (pos[:, 1] <= R1))
    assert _at(pred == 1, pos).all()
    assert len({tuple(q) for q in pos.tolist()}) == 6  # distinct
    x0, y0, x1, y1 = p.box_xyxy
    assert not _at(pred == 1, neg).any()
    assert np.all((neg[:, 0] >= x0) & (neg[:, 0] <= x1) & (neg[:, 1] >= y0) & (neg[:, 1] <= y1))
    assert len({tuple(q) for q in neg.tolist()}) == 6


def test_fewer_points_when_the_component_is_small():
    pred = np.zeros((H, W), np.int64)
    pred[5:7, 40:43] = 1  # 6 px
    (p,) = prompts_for_slice(pred, [1], _cfg(num_random_positive=50, num_negative=0), np.random.default_rng(0))
    assert (p.point_labels == 1).sum() == 6  # the interior point and the 5 others, each once
    assert len({tuple(q) for q in p.points_xy.tolist()}) == 6


def test_negatives_fall_back_to_a_ring_when_the_box_is_all_class():
    pred = _rect_pred()
    (p,) = prompts_for_slice(pred, [1], _cfg(box_margin=0, num_negative=4), np.random.default_rng(0))
    _, neg = _pos_neg(p)
    assert len(neg) == 4
    assert not _at(pred == 1, neg).any()
    inside = (neg[:, 0] >= C0) & (neg[:, 0] <= C1) & (neg[:, 1] >= R0) & (neg[:, 1] <= R1)
    assert not inside.any()
    # ... and close to the box (ring width max(margin, 2) = 2).
    assert np.all((neg[:, 0] >= C0 - 2) & (neg[:, 0] <= C1 + 2) & (neg[:, 1] >= R0 - 2) & (neg[:, 1] <= R1 + 2))


def test_no_negatives_when_none_exist():
    pred = np.ones((6, 9), np.int64)
    (p,) = prompts_for_slice(pred, [1], _cfg(num_negative=3), np.random.default_rng(0))
    assert (p.point_labels == 0).sum() == 0
    assert p.box_xyxy.tolist() == [0, 0, 8, 5]


def test_empty_class_and_tiny_component_give_no_prompt():
    pred = _rect_pred()
    pred[40, 5] = pred[40, 6] = pred[41, 5] = 2  # 3 px of class 2
    out = prompts_for_slice(pred, [1, 2, 3], _cfg(min_component_pixels=4), np.random.default_rng(0))
    assert [p.class_id for p in out] == [1]
    out = prompts_for_slice(pred, [2], _cfg(min_component_pixels=3), np.random.default_rng(0))
    assert [p.class_id for p in out] == [2]


def test_two_components_positives_only_in_the_larger_box_covers_both_but_not_specks():
    pred = _rect_pred()
    pred[30:36, 5:11] = 1  # a second piece of class 1: 36 px (the rectangle has 200)
    pred[45, 60] = 1  # a 1-px speck below min_component_pixels
    cfg = _cfg(num_random_positive=20, num_negative=0, box_margin=1, min_component_pixels=4,
               box_min_component_fraction=0.1)
    (p,) = prompts_for_slice(pred, [1], cfg, np.random.default_rng(3))
    pos, _ = _pos_neg(p)
    assert len(pos) == 21
    big = np.zeros((H, W), bool)
    big[R0:R1 + 1, C0:C1 + 1] = True
    assert _at(big, pos).all()
    assert p.box_xyxy.tolist() == [5 - 1, R0 - 1, C1 + 1, 35 + 1]


def test_several_classes_in_order_with_their_own_boxes():
    pred = _rect_pred(cls=2)
    pred[30:40, 5:12] = 1
    out = prompts_for_slice(pred, [1, 2], _cfg(box_margin=0), np.random.default_rng(0))
    assert [p.class_id for p in out] == [1, 2]
    assert out[0].box_xyxy.tolist() == [5, 30, 11, 39]
    assert out[1].box_xyxy.tolist() == [C0, R0, C1, R1]


def test_deterministic_given_the_rng():
    pred = _rect_pred()
    cfg = _cfg(num_random_positive=4, num_negative=4)
    a = prompts_for_slice(pred, [1], cfg, np.random.default_rng(7))[0]
    b = prompts_for_slice(pred, [1], cfg, np.random.default_rng(7))[0]
    c = prompts_for_slice(pred, [1], cfg, np.random.default_rng(8))[0]
    assert np.array_equal(a.points_xy, b.points_xy) and np.array_equal(a.point_labels, b.point_labels)
    assert not np.array_equal(a.points_xy, c.points_xy)
    assert np.array_equal(a.points_xy[0], c.points_xy[0])  # the interior point does not depend on the rng


def test_mask_prompt_is_the_logit_difference():
    pred = _rect_pred(cls=2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, H, W)).astype(np.float32)
    (p,) = prompts_for_slice(pred, [2], _cfg(use_mask_prompt=True), np.random.default_rng(0), class_logits=logits)
    assert p.mask_logits.dtype == np.float32 and p.mask_logits.shape == (H, W)
    np.testing.assert_array_equal(p.mask_logits, logits[2] - logits[0])
    (q,) = prompts_for_slice(pred, [2], _cfg(use_mask_prompt=False), np.random.default_rng(0), class_logits=logits)
    assert q.mask_logits is None
    (r,) = prompts_for_slice(pred, [2], _cfg(use_mask_prompt=True), np.random.default_rng(0))
    assert r.mask_logits is None
    with pytest.raises(ValueError):
        prompts_for_slice(pred, [2], _cfg(use_mask_prompt=True), rng, class_logits=logits[:, :5])


def test_summarize_prompts_is_json_of_the_summaries():
    pred = _rect_pred()
    pred[30:36, 5:11] = 2
    out = prompts_for_slice(pred, [1, 2], _cfg(box_margin=2), np.random.default_rng(0))
    text = summarize_prompts(out)
    rec = json.loads(text)
    assert [r["class_id"] for r in rec] == [1, 2]
    assert rec[0]["box_xyxy"] == [C0 - 2, R0 - 2, C1 + 2, R1 + 2]
    assert rec[0]["points_xy"][0] == [34.0, 14.0]
    assert "\n" not in text and summarize_prompts([]) == "[]"


def test_pred_must_be_2d():
    with pytest.raises(ValueError):
        prompts_for_slice(np.zeros((2, 4, 4), np.int64), [1], _cfg(), np.random.default_rng(0))


# --------------------------------------------------------------------------- windowing


def test_window_maps_the_percentiles_to_0_and_255():
    x = np.arange(200 * 50, dtype=np.float64).reshape(200, 50) * 3.0 - 100.0
    lo, hi = np.percentile(x, [0.5, 99.5])
    g = window_to_uint8(x)
    assert g.dtype == np.uint8 and g.shape == x.shape
    flat = x.ravel()
    assert g.ravel()[flat <= lo].max() == 0 and g.ravel()[flat >= hi].min() == 255
    assert g[0, 0] == 0 and g[-1, -1] == 255
    # Values are linear in between.
    mid = (lo + hi) / 2
    i = int(np.argmin(np.abs(flat - mid)))
    assert abs(int(g.ravel()[i]) - 127.5) <= 1
    # Exact percentile values map to exactly 0 and 255.
    y = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert window_to_uint8(y, (0, 100)).tolist() == [[0, 85, 170, 255]]


def test_window_constant_slice_gives_zeros():
    assert not window_to_uint8(np.full((8, 9), 42.0)).any()
    assert window_to_uint8(np.zeros((8, 9), np.float32)).dtype == np.uint8


def test_window_raw_mr_scale_and_small_structure():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1.7e6, size=(64, 64)).astype(np.float32)
    g = window_to_uint8(x)
    assert g.min() == 0 and g.max() == 255 and 100 < g.mean() < 155
    flat = np.zeros((64, 64))
    flat[10, 10] = 5.0  # < 0.5 % of the pixels: the percentile window is empty, min/max is used
    assert window_to_uint8(flat)[10, 10] == 255 and window_to_uint8(flat).sum() == 255


def test_window_rejects_nan_and_bad_input():
    x = np.ones((4, 4))
    x[1, 2] = np.nan
    with pytest.raises(ValueError):
        window_to_uint8(x)
    with pytest.raises(ValueError):
        window_to_uint8(np.ones((2, 3, 4)))
    with pytest.raises(ValueError):
        window_to_uint8(np.ones((3, 4)), (90, 10))


def test_sam_rgb_is_hwc_uint8_with_identical_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 30)) * 300.0
    rgb = to_sam_rgb(x)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    g = window_to_uint8(x)
    for k in range(3):
        np.testing.assert_array_equal(rgb[:, :, k], g)


def test_a_far_small_false_positive_does_not_stretch_the_box():
    """Seen on hippocampus: a 6-pixel speck at the slice corner made the box cover the whole slice."""
    pred = np.zeros((50, 40), np.int64)
    pred[20:30, 15:27] = 1   # the organ, 120 px
    pred[0:2, 0:3] = 1       # a speck, 6 px (>= min_component_pixels, < 25% of the organ)
    (p,) = prompts_for_slice(pred, [1], _cfg(box_margin=0), np.random.default_rng(0))
    assert p.box_xyxy.tolist() == [15, 20, 26, 29]
    (q,) = prompts_for_slice(pred, [1], _cfg(box_margin=0, box_min_component_fraction=0.0), np.random.default_rng(0))
    assert q.box_xyxy.tolist() == [0, 0, 26, 29]
