"""A small synthetic MSD dataset that looks like a toy hippocampus, for tests and demos.

Each case: two touching ellipsoids (label 1 "anterior", label 2 "posterior") with random size,
position and orientation, on a smooth background, with Gaussian noise, a smooth multiplicative bias
field and a per-case intensity scale and offset (so per-volume normalisation matters).
Volumes are (X, Y, Z) with spacing in mm along those axes; the affine is diag(spacing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

logger = logging.getLogger(__name__)

LABELS = {"0": "background", "1": "anterior", "2": "posterior"}
_MARGIN = 2
"""Voxels kept free of foreground at every border."""
_MIN_COVERAGE = 0.55
"""Fraction of slices along every axis that must show foreground."""


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random 3x3 rotation whose first column (the organ's long axis) is a jittered volume diagonal.

    A long axis along a diagonal projects onto every array axis, so the organ shows on most slices
    whichever axis is sliced; the roll around the long axis is uniform.
    """
    # A fixed orientation (jittered), as anatomy has: class 1 always lies at the low end of the diagonal,
    # so which part is which can be learnt from position as well as intensity.
    long_axis = np.ones(3) / np.sqrt(3.0) + rng.normal(scale=0.1, size=3)
    long_axis /= np.linalg.norm(long_axis)
    other = rng.normal(size=3)
    other -= other.dot(long_axis) * long_axis
    other /= np.linalg.norm(other)
    return np.stack([long_axis, other, np.cross(long_axis, other)], axis=1)


def _two_ellipsoids(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 (X, Y, Z) label with classes 1 and 2, built in coordinates normalised to [-1, 1] per axis."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    q = np.stack(grids, axis=-1)  # (X, Y, Z, 3)
    rot = _rotation(rng)
    axis = rot[:, 0]  # the long axis the two parts lie along
    radii_a = np.array([rng.uniform(0.53, 0.7), rng.uniform(0.34, 0.45), rng.uniform(0.28, 0.39)])
    radii_b = np.array([rng.uniform(0.42, 0.59), rng.uniform(0.28, 0.39), rng.uniform(0.24, 0.35)])
    center = rng.uniform(-0.08, 0.08, size=3)
    # Centres closer than the sum of the long radii: the two parts touch (overlap goes to the nearer).
    centers = (center - 0.8 * radii_a[0] * axis, center + 0.8 * radii_b[0] * axis)
    dists = []
    for c, radii in zip(centers, (radii_a, radii_b), strict=True):
        local = (q - c) @ rot  # coordinates along the rotated axes
        dists.append(np.sqrt(((local / radii) ** 2).sum(axis=-1)))
    inside_a, inside_b = dists[0] <= 1.0, dists[1] <= 1.0
    label = np.zeros(shape, dtype=np.uint8)
    label[inside_a] = 1
    label[inside_b & (~inside_a | (dists[1] < dists[0]))] = 2
    return label


def _acceptable(label: np.ndarray) -> bool:
    """Both classes present, foreground on most slices of every axis, nothing near the border."""
    if not {1, 2} <= set(np.unique(label).tolist()):
        return False
    fg = label > 0
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = fg.any(axis=other)
        n = present.size
        if present[:_MARGIN].any() or present[n - _MARGIN:].any() or present.mean() < _MIN_COVERAGE:
            return False
    return True


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-max-magnitude smooth random field (X, Y, Z)."""
    field = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="reflect")
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)


def _image(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 (X, Y, Z) MR-like intensities for ``label``."""
    shape = label.shape
    sigma = max(shape) / 6.0
    background = 0.3 + 0.08 * _smooth_field(shape, rng, sigma)
    means = np.array([0.0, rng.uniform(0.75, 0.85), rng.uniform(0.55, 0.65)])
    tissue = gaussian_filter(means[label], sigma=0.6)  # partial-volume edges
    weight = gaussian_filter((label > 0).astype(np.float64), sigma=0.6)
    clean = background * (1.0 - weight) + tissue
    bias = np.exp(0.25 * _smooth_field(shape, rng, max(shape) / 3.0))
    noisy = clean * bias + rng.normal(scale=0.04, size=shape)
    scale = 10.0 ** rng.uniform(1.5, 4.5)
    offset = rng.uniform(0.0, 0.2) * scale
    return (noisy * scale + offset).astype(np.float32)


def _save(data: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    img.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_split_file(path: Path, case_ids: list[str], num_test: int) -> Path:
    """Write ``{"test": first num_test ids, "train_order": the rest}`` as JSON; returns ``path``."""
    if not 0 <= num_test <= len(case_ids):
        raise ValueError(f"num_test={num_test} must be between 0 and the number of cases ({len(case_ids)})")
    path = Path(path)
    path.write_text(json.dumps({"test": list(case_ids[:num_test]), "train_order": list(case_ids[num_test:])},
                               indent=1) + "\n")
    return path


def write_synthetic_msd(out_dir: Path, num_cases: int = 8, shape: tuple[int, int, int] = (24, 40, 32),
                        spacing: tuple[float, float, float] = (1.0, 0.8, 1.2), seed: int = 0) -> Path:
    """Write a synthetic MSD dataset to ``out_dir`` and return ``out_dir``.

    Writes ``dataset.json``, ``imagesTr/case_XXX.nii.gz`` (float32 (X, Y, Z) = ``shape``),
    ``labelsTr/case_XXX.nii.gz`` (uint8, values {0, 1, 2}) with affine diag(``spacing``) (mm), and
    ``splits.json`` with max(1, num_cases // 4) test cases. Deterministic given ``seed``.
    """
    if num_cases < 2:
        raise ValueError(f"num_cases={num_cases}: need at least 2 (one test, one training case)")
    if len(shape) != 3 or min(shape) < 12:
        raise ValueError(f"shape {shape} must be 3 sizes of at least 12 voxels")
    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    rng = np.random.default_rng(seed)
    width = max(3, len(str(num_cases - 1)))
    case_ids = [f"case_{i:0{width}d}" for i in range(num_cases)]
    for case_id in case_ids:
        for _ in range(200):
            label = _two_ellipsoids(shape, rng)
            if _acceptable(label):
                break
        else:
            raise ValueError(f"could not place the toy organ in shape {shape}; use a larger shape")
        _save(_image(label, rng), spacing, out_dir / "imagesTr" / f"{case_id}.nii.gz")
        _save(label, spacing, out_dir / "labelsTr" / f"{case_id}.nii.gz")
    meta = {
        "name": "SyntheticHippocampus",
        "description": "Toy hippocampus: two touching ellipsoids, smooth background, bias field, noise",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": num_cases,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": [],
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_split_file(out_dir / "splits.json", case_ids, num_test=max(1, num_cases // 4))
    logger.info("wrote synthetic MSD dataset %s: %d cases of shape %s, spacing %s mm", out_dir, num_cases,
                shape, spacing)
    return out_dir
