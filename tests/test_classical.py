"""The random-walker generalist on a synthetic slice, prompted by pipeline.prompts from a flawed prediction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import random_walker

from pipeline.config import ClassicalConfig, PromptConfig
from pipeline.generalist.base import Generalist, SlicePrompt
from pipeline.generalist.classical import RandomWalkerGeneralist
from pipeline.prompts import prompts_for_slice

H, W = 64, 72


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


A = _ellipse(22, 20, 11, 8)  # the target: tall, upper left
B = _ellipse(44, 50, 8, 13)  # a distractor: wide, lower right


def _slice() -> np.ndarray:
    """float32 (H, W) on a raw-MR-like scale: bright ellipses on a darker noisy background."""
    rng = np.random.default_rng(0)
    img = 0.25 + 0.06 * rng.normal(size=(H, W))
    img[A] += 0.6
    img[B] += 0.5
    return (img * 1e5).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _flawed_prediction(mask: np.ndarray, erode: int = 2, shift: int = 2) -> np.ndarray:
    """A specialist's under-segmentation: the mask eroded, then shifted down-left."""
    pred = np.zeros((H, W), np.int64)
    pred[np.roll(ndimage.binary_erosion(mask, iterations=erode), (shift, -shift), axis=(0, 1))] = 1
    return pred


@pytest.fixture(scope="module")
def embedded():
    img = _slice()
    emb = RandomWalkerGeneralist(ClassicalConfig()).embed(img[None])
    return img, emb[0]


def _check_result(res, prompts):
    assert res.masks.shape == (len(prompts), H, W) and res.masks.dtype == bool
    assert res.scores.shape == (len(prompts),) and res.scores.dtype == np.float32
    assert res.logits.shape == (len(prompts), H, W) and res.logits.dtype == np.float32
    assert np.all((res.scores >= 0) & (res.scores <= 1))
    assert np.all(np.abs(res.logits) <= 20)
    for p, m, lg in zip(prompts, res.masks, res.logits, strict=True):
        assert np.array_equal(m, lg > 0)  # mask and logits agree
        if p.box_xyxy is not None:
            x0, y0, x1, y1 = p.box_xyxy.astype(int)
            outside = np.ones((H, W), bool)
            outside[y0:y1 + 1, x0:x1 + 1] = False
            assert not m[outside].any()
            assert np.all(lg[outside] == -20)


def test_embed_is_the_windowed_slice_in_unit_range(embedded):
    img, emb = embedded
    assert emb.shape == (H, W) and emb.dtype == np.float32
    assert emb.min() == 0.0 and emb.max() == 1.0
    assert emb[A].mean() > 0.8 and emb[~(A | B)].mean() < 0.3
    g = RandomWalkerGeneralist(ClassicalConfig())
    with pytest.raises(ValueError):
        g.embed(img)  # (H, W), not (B, H, W)
    gen: Generalist = g  # satisfies the protocol
    assert gen.name == "classical-random-walker"


CONFIGS = {
    "box-outside-bg": (PromptConfig(box_margin=4), ClassicalConfig(box_outside_is_background=True)),
    "box-ring": (PromptConfig(box_margin=2, num_negative=0), ClassicalConfig(box_outside_is_background=False)),
    "points-only": (PromptConfig(use_box=False), ClassicalConfig()),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recovers_the_ellipse_from_a_flawed_prediction(embedded, name):
    _, emb = embedded
    pcfg, ccfg = CONFIGS[name]
    pred = _flawed_prediction(A)
    assert _dice(pred == 1, A) < 0.75  # the specialist is clearly off
    prompts = prompts_for_slice(pred, [1], pcfg, np.random.default_rng(1))
    res = RandomWalkerGeneralist(ccfg).decode(emb, (H, W), prompts)
    _check_result(res, prompts)
    assert _dice(res.masks[0], A) > 0.8
    assert not (res.masks[0] & B).any()
    assert res.scores[0] > 0.5


@pytest.mark.parametrize("use_box", [True, False])
def test_a_prompt_on_the_other_ellipse_does_not_segment_the_first(embedded, use_box):
    _, emb = embedded
    pred = _flawed_prediction(B, erode=2, shift=0)
    prompts = prompts_for_slice(pred, [1], PromptConfig(use_box=use_box), np.random.default_rng(2))
    res = RandomWalkerGeneralist(ClassicalConfig()).decode(emb, (H, W), prompts)
    _check_result(res, prompts)
    assert (res.masks[0] & A).sum() == 0
    assert _dice(res.masks[0], B) > 0.8


def test_several_prompts_in_one_call(embedded):
    _, emb = embedded
    pred = _flawed_prediction(A, erode=1, shift=0)
    pred[_flawed_prediction(B, erode=1, shift=0) == 1] = 2
    prompts = prompts_for_slice(pred, [1, 2], PromptConfig(), np.random.default_rng(0))
    res = RandomWalkerGeneralist(ClassicalConfig()).decode(emb, (H, W), prompts)
    _check_result(res, prompts)
    assert _dice(res.masks[0], A) > 0.9 and _dice(res.masks[1], B) > 0.9


def test_the_box_crop_gives_the_full_slice_solution(embedded):
    """Solving on the box (+1 px) with rescaled beta equals skimage's walk on the whole slice."""
    _, emb = embedded
    cfg = ClassicalConfig(background_ring=0, box_outside_is_background=True)
    (p,) = prompts_for_slice(_flawed_prediction(A), [1], PromptConfig(box_margin=4), np.random.default_rng(1))
    res = RandomWalkerGeneralist(cfg).decode(emb, (H, W), [p])
    x0, y0, x1, y1 = p.box_xyxy.astype(int)
    seeds = np.full((H, W), 2, np.int32)
    seeds[y0:y1 + 1, x0:x1 + 1] = 0
    xy = p.points_xy.astype(int)
    seeds[xy[:, 1], xy[:, 0]] = np.where(p.point_labels == 1, 1, 2)
    full = random_walker(emb.astype(np.float64), seeds, beta=cfg.beta, mode="bf", return_full_prob=True)[0]
    inner = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    expected = np.log(np.clip(full, 1e-9, 1 - 1e-9)) - np.log1p(-np.clip(full, 1e-9, 1 - 1e-9))
    np.testing.assert_allclose(res.logits[0][inner], np.clip(expected, -20, 20)[inner], atol=1e-3)
    assert np.array_equal(res.masks[0], full > 0.5)


def test_no_positive_point_gives_an_empty_mask(embedded):
    _, emb = embedded
    p = SlicePrompt(class_id=1, points_xy=np.array([[20.0, 22.0]], np.float32),
                    point_labels=np.array([0], np.int32), box_xyxy=np.array([10, 10, 30, 34], np.float32))
    res = RandomWalkerGeneralist(ClassicalConfig()).decode(emb, (H, W), [p])
    assert not res.masks.any() and res.scores.tolist() == [0.0]
    empty = RandomWalkerGeneralist(ClassicalConfig()).decode(emb, (H, W), [])
    assert empty.masks.shape == (0, H, W) and empty.scores.shape == (0,) and empty.logits.shape == (0, H, W)


def test_edge_cases_do_not_crash():
    g = RandomWalkerGeneralist(ClassicalConfig())
    # A constant slice (zero std: skimage would divide by zero) with a box prompt and a points-only prompt.
    emb = g.embed(np.full((1, 24, 30), 7.0, np.float32))[0]
    assert not emb.any()
    box_p = SlicePrompt(1, np.array([[10.0, 8.0], [3.0, 3.0]], np.float32), np.array([1, 0], np.int32),
                        np.array([6, 4, 14, 12], np.float32))
    pts_p = SlicePrompt(1, np.array([[10.0, 8.0]], np.float32), np.array([1], np.int32))
    res = g.decode(emb, (24, 30), [box_p, pts_p])
    assert np.isfinite(res.logits).all() and np.all((res.scores >= 0) & (res.scores <= 1))
    assert res.masks[0][8, 10] and not res.masks[0][:4].any()
    # Every pixel seeded: a one-pixel box around the positive point.
    one = SlicePrompt(1, np.array([[5.0, 6.0]], np.float32), np.array([1], np.int32),
                      np.array([5, 6, 5, 6], np.float32))
    res = g.decode(emb, (24, 30), [one])
    assert res.masks[0].sum() == 1 and res.masks[0][6, 5] and res.scores[0] == 1.0
    # A positive point outside the box cannot reach it: empty mask, score 0.
    outside = SlicePrompt(1, np.array([[2.0, 20.0]], np.float32), np.array([1], np.int32),
                          np.array([20, 5, 29, 12], np.float32))
    res = g.decode(emb, (24, 30), [outside])
    assert not res.masks.any() and res.scores[0] == 0.0
    # Points outside the slice are clipped onto it (x=-3, y=50 -> row 23, col 0); swapped box corners are sorted.
    clipped = SlicePrompt(1, np.array([[-3.0, 50.0]], np.float32), np.array([1], np.int32))
    assert g.decode(emb, (24, 30), [clipped]).masks[0][23, 0]
    swapped = SlicePrompt(1, np.array([[24.0, 19.0]], np.float32), np.array([1], np.int32),
                          np.array([29, 23, 20, 15], np.float32))
    res = g.decode(emb, (24, 30), [swapped])
    assert res.masks[0][19, 24] and not res.masks[0][:15].any() and not res.masks[0][:, :20].any()
    with pytest.raises(ValueError):
        g.decode(emb, (24, 31), [pts_p])
