"""Augmentation of training crops, and the padding that inference must share with training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.models.inference import _pad_to_multiple, predict_slices
from pipeline.models.unet import build_model
from pipeline.training.augment import affine_crop, augment_intensity, random_affine
from pipeline.training.sampling import crop_around, sample_crop

OFF = AugmentConfig(enabled=True, spatial_probability=0.0, intensity_probability=0.0)


def _ramp(shape=(20, 24)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_identity_affine_crop_equals_plain_crop():
    arr = _ramp()
    plain = crop_around(arr, (10, 12), (7, 9), fill=-1.0)
    np.testing.assert_array_equal(affine_crop(arr, (10, 12), (7, 9), np.eye(2), -1.0, order=1), plain)
    # near the edge crop_around shifts the window inside the array; affine_crop keeps the centre and pads
    out = affine_crop(arr, (1, 1), (7, 7), np.eye(2), -1.0, order=0)
    assert out[0, 0] == -1.0 and out[3, 3] == arr[1, 1]  # outside the array: the fill value


def test_quarter_turn_matrix_rotates_the_crop():
    arr = _ramp()
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    out = affine_crop(arr, (10, 12), (7, 7), rot, 0.0, order=1)
    np.testing.assert_allclose(out, np.rot90(crop_around(arr, (10, 12), (7, 7), 0.0), k=-1))


def test_random_affine_respects_the_config():
    rng = np.random.default_rng(0)
    assert random_affine(2, OFF, rng) is None
    rot_only = AugmentConfig(spatial_probability=1.0, rotation_degrees=30, scale_range=[1.0, 1.0])
    for _ in range(20):
        m = random_affine(3, rot_only, rng)
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)  # a rotation: orthonormal
        assert np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1))) <= 30 + 1e-9
    scale_only = AugmentConfig(spatial_probability=1.0, rotation_degrees=0, scale_range=[0.8, 1.25])
    scales = [random_affine(2, scale_only, rng)[0, 0] for _ in range(50)]
    assert 0.8 <= min(scales) < max(scales) <= 1.25


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_sample_crop_moves_image_target_and_weight_together(slice_axis: int):
    """Flips map voxels exactly (odd patch): the image, built equal to the target, must stay equal."""
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, (9, 11, 13)).astype(np.uint8)
    image = target.astype(np.float32)
    weight = (target > 0).astype(np.float32)
    flips = AugmentConfig(spatial_probability=0.0, mirror=True, intensity_probability=0.0)
    changed = 0
    for seed in range(10):
        plain = sample_crop(image, target, weight, (7, 7), slice_axis, np.random.default_rng(seed))
        crop = sample_crop(image, target, weight, (7, 7), slice_axis, np.random.default_rng(seed), augment=flips)
        np.testing.assert_array_equal(crop.image, crop.target.astype(np.float32))
        np.testing.assert_array_equal(crop.weight, (crop.target > 0).astype(np.float32))
        changed += not np.array_equal(crop.target, plain.target)
    assert changed > 0  # the flips did something


def test_rotated_labels_keep_their_values_and_padding_weight_is_zero():
    target = np.zeros((1, 30, 30), np.uint8)
    target[0, 5:25, 8:20] = 2
    weight = np.ones(target.shape, np.float32)
    cfg = AugmentConfig(spatial_probability=1.0, rotation_degrees=45, scale_range=[1.3, 1.3])
    crop = sample_crop(target.astype(np.float32), target, weight, (40, 40), 0, np.random.default_rng(3),
                       augment=cfg)
    assert set(np.unique(crop.target)) <= {0, 2}
    assert set(np.unique(crop.weight)) == {0.0, 1.0}  # outside the volume: weight 0
    assert (crop.target[crop.weight == 0] == 0).all()


def test_intensity_changes_only_when_drawn():
    x = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    same = augment_intensity(x, OFF, np.random.default_rng(0))
    np.testing.assert_array_equal(same, x)
    on = AugmentConfig(intensity_probability=1.0)
    out = augment_intensity(x, on, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == x.shape and not np.allclose(out, x)
    np.testing.assert_array_equal(x, augment_intensity(x, OFF, np.random.default_rng(5)))  # input untouched


def test_padding_value_is_used():
    x = torch.zeros(1, 1, 5, 6)
    padded, shape = _pad_to_multiple(x, 4, value=-3.0)
    assert padded.shape == (1, 1, 8, 8) and shape == (5, 6)
    assert (padded[..., 5:, :] == -3).all() and (padded[..., :, 6:] == -3).all() and (padded[..., :5, :6] == 0).all()


def test_inference_pads_with_the_minimum_like_training_crops():
    """A slice whose size is not a multiple of 2**depth predicts as if the caller had padded it with its
    minimum (what training crops are padded with), not with zeros."""
    torch.manual_seed(0)
    model = build_model({"dims": 2, "in_channels": 1, "num_classes": 3, "base_channels": 4, "depth": 2,
                         "dropout": 0.0})
    slices = np.random.default_rng(0).normal(size=(2, 13, 10)).astype(np.float32) - 2.0  # min far from 0
    fill = float(slices.min())
    by_hand = np.pad(slices, ((0, 0), (0, 3), (0, 2)), constant_values=fill)
    ours = predict_slices(model, slices, torch.device("cpu"))
    ref = predict_slices(model, by_hand, torch.device("cpu"))[:, :, :13, :10]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
