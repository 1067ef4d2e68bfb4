"""Random training crops from in-memory volumes (X, Y, Z).

2D: pick a slice along ``slice_axis``, then a ``patch_size`` (2 numbers) crop of it.
3D: a ``patch_size`` (3 numbers) crop of the volume.
Volumes smaller than the patch are padded: images with their minimum, labels with 0 (background) and
weights with 0 (padding never counts in the pseudo-label loss). With an ``AugmentConfig`` the crop is
taken through a random rotation/scale around its centre and the image gets intensity changes
(``pipeline.training.augment``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.training.augment import affine_crop, augment_intensity, random_affine


@dataclass
class Crop:
    """image float32 (*P); target uint8 (*P) or None; weight float32 (*P) or None (P = patch shape)."""

    image: np.ndarray
    target: np.ndarray | None
    weight: np.ndarray | None


def crop_around(arr: np.ndarray, center: tuple[int, ...], size: tuple[int, ...], fill: float) -> np.ndarray:
    """A ``size`` window of ``arr`` as near ``center`` as fits, padded with ``fill`` where arr is smaller."""
    slices, pads = [], []
    for c, s, n in zip(center, size, arr.shape, strict=True):
        start = int(np.clip(c - s // 2, 0, max(0, n - s)))
        stop = min(n, start + s)
        slices.append(slice(start, stop))
        missing = s - (stop - start)
        pads.append((missing // 2, missing - missing // 2))
    out = np.asarray(arr[tuple(slices)])
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, pads, constant_values=fill)
    return out


def sample_crop(image: np.ndarray, target: np.ndarray | None, weight: np.ndarray | None, patch_size: tuple[int, ...],
                slice_axis: int, rng: np.random.Generator, foreground_probability: float = 0.0,
                augment: AugmentConfig | None = None) -> Crop:
    """One random crop. With probability ``foreground_probability`` (and a target with foreground) the crop
    is centred on a random foreground voxel of ``target``. ``augment`` (enabled) transforms it."""
    center3 = None
    if target is not None and foreground_probability > 0 and rng.random() < foreground_probability:
        fg = np.flatnonzero(target)
        if fg.size:
            center3 = np.unravel_index(fg[rng.integers(fg.size)], target.shape)
    if center3 is None:
        center3 = tuple(int(rng.integers(n)) for n in image.shape)
    if len(patch_size) == 2:
        s = int(center3[slice_axis])
        image, target, weight = (None if a is None else np.take(a, s, axis=slice_axis) for a in (image, target, weight))
        center = tuple(c for i, c in enumerate(center3) if i != slice_axis)
    else:
        center = tuple(int(c) for c in center3)
    fill = float(image.min())
    matrix = random_affine(len(patch_size), augment, rng) if augment is not None and augment.enabled else None
    if matrix is None:
        crop = Crop(
            image=crop_around(image, center, patch_size, fill).astype(np.float32),
            target=None if target is None else crop_around(target, center, patch_size, 0),
            weight=None if weight is None else crop_around(weight, center, patch_size, 0.0).astype(np.float32),
        )
    else:
        crop = Crop(
            image=affine_crop(image.astype(np.float32, copy=False), center, patch_size, matrix, fill, order=1),
            target=None if target is None else affine_crop(target, center, patch_size, matrix, 0, order=0),
            weight=None if weight is None else affine_crop(np.asarray(weight, np.float32), center, patch_size,
                                                           matrix, 0.0, order=0),
        )
    if augment is not None and augment.enabled:
        crop.image = augment_intensity(crop.image, augment, rng)
    return crop
