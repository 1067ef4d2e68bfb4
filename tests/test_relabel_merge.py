"""merge_class_masks: per-class generalist masks -> one label map; case_rng: the per-case prompt sampler."""

from __future__ import annotations

import numpy as np

from pipeline.relabel import case_rng, merge_class_masks


def _two_overlapping():
    masks = np.zeros((2, 4, 6), bool)
    masks[0, :, 0:4] = True   # class A: columns 0..3
    masks[1, :, 2:5] = True   # class B: columns 2..4 (overlap: columns 2, 3); column 5 in neither
    logits = np.zeros((2, 4, 6), np.float32)
    logits[0] = 1.0
    logits[1] = 0.5
    logits[1, :, 3] = 2.0     # B wins the overlap at column 3, A wins at column 2
    return masks, logits


def test_overlap_resolved_by_higher_logit_and_ids_mapped():
    masks, logits = _two_overlapping()
    out = merge_class_masks(masks, logits, [2, 5])
    assert out.dtype == np.uint8 and out.shape == (4, 6)
    expected_row = np.array([2, 2, 2, 5, 5, 0], np.uint8)
    np.testing.assert_array_equal(out, np.tile(expected_row, (4, 1)))


def test_order_of_prompts_does_not_matter():
    masks, logits = _two_overlapping()
    out = merge_class_masks(masks[::-1], logits[::-1], [5, 2])
    np.testing.assert_array_equal(out, merge_class_masks(masks, logits, [2, 5]))


def test_logit_outside_own_mask_is_ignored():
    masks, logits = _two_overlapping()
    logits[1, :, 0] = 100.0  # B is very confident at column 0, but its mask does not cover it
    out = merge_class_masks(masks, logits, [2, 5])
    assert (out[:, 0] == 2).all()
    # a mask with negative logits inside still beats "no mask"
    logits[0] = -3.0
    out = merge_class_masks(masks, logits, [2, 5])
    np.testing.assert_array_equal(out[0], [2, 2, 5, 5, 5, 0])


def test_no_masks_is_background():
    masks = np.zeros((3, 5, 5), bool)
    logits = np.random.default_rng(0).normal(size=(3, 5, 5)).astype(np.float32)
    out = merge_class_masks(masks, logits, [1, 2, 3])
    assert out.shape == (5, 5) and (out == 0).all()
    empty = merge_class_masks(np.zeros((0, 5, 7), bool), np.zeros((0, 5, 7), np.float32), [])
    assert empty.shape == (5, 7) and empty.dtype == np.uint8 and (empty == 0).all()


def test_single_class():
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 1, 1] = True
    out = merge_class_masks(masks, np.full((1, 3, 3), -1.0, np.float32), [7])
    expected = np.zeros((3, 3), np.uint8)
    expected[1, 1] = 7
    np.testing.assert_array_equal(out, expected)


def test_case_rng_is_per_case_and_round():
    a = case_rng(0, 1, "case_001").integers(0, 1 << 30, 5)
    np.testing.assert_array_equal(a, case_rng(0, 1, "case_001").integers(0, 1 << 30, 5))
    assert not np.array_equal(a, case_rng(0, 2, "case_001").integers(0, 1 << 30, 5))
    assert not np.array_equal(a, case_rng(0, 1, "case_002").integers(0, 1 << 30, 5))
    assert not np.array_equal(a, case_rng(1, 1, "case_001").integers(0, 1 << 30, 5))
