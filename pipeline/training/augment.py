"""Data augmentation of training crops: one spatial transform shared by image, target and weight, then
intensity changes of the image only.

Spatial (nnU-Net's defaults, smaller ranges): a rotation in the crop plane (2D) or in one random axis
plane (3D), an isotropic scale, and optional mirroring. The transform is applied while cropping, around
the crop centre, so nothing outside the crop is resampled: output voxel ``o`` of the patch reads input
position ``center + A @ (o - patch_center)``. Images are interpolated linearly (outside filled with the
volume's minimum, as the crop padding is); targets and weights take the nearest voxel (outside: 0, so
padding never counts in the pseudo-label loss).

Intensity (image only, on z-scored values): multiplicative brightness, contrast around the crop mean,
gamma on the crop rescaled to [0, 1], additive Gaussian noise.

The unlabeled stream is augmented the same way; its pseudo-label target and weight follow the spatial
transform, so the pseudo-label term sees matching pairs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.config import AugmentConfig


def random_affine(ndim: int, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray | None:
    """A (ndim, ndim) matrix mapping patch offsets to volume offsets, or None for the identity."""
    a = np.eye(ndim)
    changed = False
    if cfg.rotation_degrees > 0 and rng.random() < cfg.spatial_probability:
        angle = np.deg2rad(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
        i, j = (0, 1) if ndim == 2 else tuple(sorted(rng.choice(3, size=2, replace=False)))
        rot = np.eye(ndim)
        rot[i, i] = rot[j, j] = np.cos(angle)
        rot[i, j], rot[j, i] = -np.sin(angle), np.sin(angle)
        a = rot @ a
        changed = True
    if cfg.scale_range != [1.0, 1.0] and rng.random() < cfg.spatial_probability:
        a = a * rng.uniform(*cfg.scale_range)
        changed = True
    if cfg.mirror:
        flips = rng.random(ndim) < 0.5
        if flips.any():
            a = a @ np.diag(np.where(flips, -1.0, 1.0))
            changed = True
    return a if changed else None


def affine_crop(arr: np.ndarray, center: tuple[int, ...], size: tuple[int, ...], matrix: np.ndarray,
                fill: float, order: int) -> np.ndarray:
    """A ``size`` patch of ``arr`` (same ndim) whose centre is ``center``, sampled through ``matrix``."""
    out_center = (np.asarray(size, float) - 1) / 2
    offset = np.asarray(center, float) - matrix @ out_center
    return ndimage.affine_transform(arr, matrix, offset=offset, output_shape=tuple(size), order=order,
                                    mode="constant", cval=fill, prefilter=False)


def augment_intensity(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, gamma and noise on a z-scored crop; returns float32 of the same shape."""
    x = image.astype(np.float32, copy=True)
    p = cfg.intensity_probability
    if rng.random() < p:
        x *= rng.uniform(*cfg.brightness_range)
    if rng.random() < p:
        mean = x.mean()
        x = (x - mean) * rng.uniform(*cfg.contrast_range) + mean
    if rng.random() < p:
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            x = ((x - lo) / (hi - lo)) ** rng.uniform(*cfg.gamma_range) * (hi - lo) + lo
    if cfg.noise_std > 0 and rng.random() < p:
        x += rng.normal(0.0, rng.uniform(0, cfg.noise_std), x.shape).astype(np.float32)
    return x.astype(np.float32, copy=False)
