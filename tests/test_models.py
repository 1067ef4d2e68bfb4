"""The U-Net and whole-volume prediction: shapes, slice-axis handling, sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.models.inference import _window_starts, predict_patches, predict_slices, predict_volume
from pipeline.models.unet import UNet, build_model, model_args

CPU = torch.device("cpu")
NUM_CLASSES = 3


def _model(dims: int, seed: int = 0, depth: int = 2) -> UNet:
    torch.manual_seed(seed)
    return UNet(dims, 1, NUM_CLASSES, base_channels=4, depth=depth, dropout=0.2).eval()


def _volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -------------------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("dims,spatial", [(2, (16, 24)), (3, (8, 16, 12))])
def test_unet_output_shape(dims: int, spatial: tuple[int, ...]):
    model = _model(dims)
    x = torch.randn(2, 1, *spatial)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES, *spatial)
    assert torch.isfinite(out).all()
    assert model.dims == dims and len(model.encoders) == 3 and len(model.decoders) == 2


def test_unet_channels_double_per_level():
    model = _model(2, depth=3)
    widths = [enc[0].out_channels for enc in model.encoders]
    assert widths == [4, 8, 16, 32]
    assert model.head.out_channels == NUM_CLASSES


def test_unet_bad_dims():
    with pytest.raises(ValueError, match="dims"):
        UNet(4, 1, 2)


def test_model_args_from_config_build_the_same_network():
    cfg = ModelConfig(kind="unet3d", base_channels=4, depth=2, dropout=0.0, patch_size=[16, 16, 16])
    args = model_args(cfg, num_classes=2)
    assert args == {"dims": 3, "in_channels": 1, "num_classes": 2, "base_channels": 4, "depth": 2, "dropout": 0.0}
    model = build_model(args)
    assert model.dims == 3 and model.depth == 2 and model.head.out_channels == 2


def test_unet_dropout_only_in_training():
    model = _model(2)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert not torch.allclose(a, b)  # dropout at the bottleneck gives MC passes their randomness


# --------------------------------------------------------------------------------- 2D prediction


def _by_hand_2d(model: UNet, volume: np.ndarray, slice_axis: int) -> np.ndarray:
    """Run the model on each slice along slice_axis separately (padded with the volume's minimum, as
    training crops are, to a multiple of 4)."""
    out = []
    with torch.no_grad():
        for i in range(volume.shape[slice_axis]):
            sl = np.take(volume, i, axis=slice_axis)  # (H, W) in the remaining axes' order
            h, w = sl.shape
            x = torch.from_numpy(np.ascontiguousarray(sl))[None, None]
            x = F.pad(x, (0, (-w) % 4, 0, (-h) % 4), value=float(volume.min()))
            out.append(model(x)[0, :, :h, :w].numpy())
    return np.stack(out, axis=slice_axis + 1)  # (C, X, Y, Z)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_predict_volume_2d_shape_and_axis_handling(slice_axis: int):
    model = _model(2)
    volume = _volume((9, 11, 7), seed=slice_axis)
    logits = predict_volume(model, volume, slice_axis, (16, 16), CPU)
    assert logits.shape == (NUM_CLASSES, 9, 11, 7) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, _by_hand_2d(model, volume, slice_axis), atol=1e-5, rtol=0)


def test_predict_volume_2d_axes_differ():
    """Slicing along another axis gives a different answer: the axis argument is really used."""
    model = _model(2)
    volume = _volume((12, 12, 12))
    a = predict_volume(model, volume, 0, (16, 16), CPU)
    b = predict_volume(model, volume, 1, (16, 16), CPU)
    assert a.shape == b.shape
    assert np.abs(a - b).max() > 1e-3


def test_predict_slices_batch_size_does_not_matter():
    model = _model(2)
    slices = _volume((5, 13, 10))
    a = predict_slices(model, slices, CPU, batch_size=16)
    b = predict_slices(model, slices, CPU, batch_size=2)
    assert a.shape == (NUM_CLASSES, 5, 13, 10)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_predict_volume_puts_model_in_eval():
    model = _model(2).train()
    volume = _volume((4, 8, 8))
    a = predict_volume(model, volume, 0, (8, 8), CPU)
    b = predict_volume(model, volume, 0, (8, 8), CPU)
    assert not model.training
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------- 3D prediction


def test_window_starts_cover_the_axis():
    assert _window_starts(8, 8) == [0]
    assert _window_starts(5, 8) == [0]
    assert _window_starts(16, 8) == [0, 4, 8]
    assert _window_starts(18, 8) == [0, 4, 8, 10]
    for size, patch in [(17, 8), (40, 16), (9, 4), (33, 32)]:
        starts = _window_starts(size, patch)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert all(b - a <= patch // 2 for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("shape", [(21, 19, 13), (5, 7, 6)])
def test_predict_volume_3d_shape(shape: tuple[int, int, int]):
    model = _model(3)
    volume = _volume(shape)
    logits = predict_volume(model, volume, 0, (8, 8, 8), CPU)
    assert logits.shape == (NUM_CLASSES, *shape) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_sliding_window_with_one_window_equals_a_padded_forward_pass():
    model = _model(3)
    volume = _volume((13, 10, 7))
    logits = predict_volume(model, volume, 0, (16, 16, 16), CPU)
    x = torch.from_numpy(volume)[None, None]
    x = F.pad(x, (0, 16 - 7, 0, 16 - 10, 0, 16 - 13), value=float(volume.min()))  # as training crops pad
    with torch.no_grad():
        ref = model(x)[0, :, :13, :10, :7].numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)


def test_sliding_window_averages_overlapping_windows():
    """Along one axis with two overlapping windows, the overlap is the mean of both windows' logits."""
    model = _model(3)
    volume = _volume((12, 8, 8))  # patch 8 on axis 0: windows start at 0 and 4 (overlap 4..8)
    logits = predict_patches(model, volume, (8, 8, 8), CPU)
    x = torch.from_numpy(volume)[None, None]
    with torch.no_grad():
        w0 = model(x[:, :, 0:8])[0].numpy()
        w1 = model(x[:, :, 4:12])[0].numpy()
    np.testing.assert_allclose(logits[:, :4], w0[:, :4], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 4:8], (w0[:, 4:] + w1[:, :4]) / 2, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 8:], w1[:, 4:], atol=1e-5, rtol=0)
