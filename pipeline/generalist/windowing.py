"""Per-slice intensity windowing: any scale (raw MR, z-scored, CT HU) -> 8-bit grey, as SAM expects.

Each slice is windowed on its own: its ``[p_lo, p_hi]`` percentiles (0.5 and 99.5 by default, robust to
the bright outliers of MR) map linearly to ``[0, 255]``, values outside are clipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _window_bounds(x: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    if len(percentiles) != 2:
        raise ValueError(f"percentiles must be two numbers (lo, hi), got {percentiles!r}")
    p_lo, p_hi = float(percentiles[0]), float(percentiles[1])
    if not 0.0 <= p_lo < p_hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles!r}")
    lo, hi = np.percentile(x, [p_lo, p_hi])
    if hi <= lo:
        # The window collapsed (e.g. a small bright structure covering < 0.5 % of a flat slice): fall back
        # to the full range so the structure is not lost; a constant slice keeps hi == lo.
        lo, hi = x.min(), x.max()
    return float(lo), float(hi)


def window_to_uint8(slice_: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Window one slice to 8-bit grey.

    slice_: float (H, W), any intensity scale. percentiles: (lo, hi) in [0, 100].
    Returns uint8 (H, W): ``round(255 * (x - p_lo) / (p_hi - p_lo))`` clipped to [0, 255], where p_lo / p_hi
    are the slice's own percentiles (its min / max when the percentile window is empty). A constant slice
    gives all zeros. Raises ValueError on a non-2D input or on NaN / infinite values.
    """
    x = np.asarray(slice_, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"slice must be 2D (H, W), got shape {x.shape}")
    if x.size == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    if not np.isfinite(x).all():
        raise ValueError("slice holds NaN or infinite values; cannot window it")
    lo, hi = _window_bounds(x, percentiles)
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (x - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)


def to_sam_rgb(slice_: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Window one slice and repeat it in 3 channels: uint8 (H, W, 3) RGB, SAM's ``set_image`` input (HWC)."""
    grey = window_to_uint8(slice_, percentiles)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
