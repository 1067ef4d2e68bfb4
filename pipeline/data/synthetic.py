"""A small synthetic MSD dataset that looks like a toy hippocampus, for tests and demos.

Each case: two touching ellipsoids (label 1 "anterior", label 2 "posterior") with random size,
position and orientation, on a smooth background, with Gaussian noise, a smooth multiplicative bias
field and a per-case intensity scale and offset (so per-volume normalisation matters).
Volumes are (X, Y, Z) with spacing in mm along those axes; the affine is diag(spacing).

Two intensity styles (``STYLES``), same shapes:

- ``hippocampus`` (the default, for tests): the parts differ little from each other and from the
  background, as in MR hippocampus; an edge-following generalist has little to hold on to.
- ``edges`` (``semisam demo-data``): each part and the background have clearly different intensities,
  so a part's outline is a real intensity edge, the kind the weight-free random walker follows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


def _toy_label(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Two touching ellipsoids that fit the volume (up to 200 draws from ``rng``)."""
    for _ in range(200):
        label = _two_ellipsoids(shape, rng)
        if _acceptable(label):
            return label
    raise ValueError(f"could not place the toy organ in shape {shape}; use a larger shape")


def _case_ids(num_cases: int) -> list[str]:
    """case_000, case_001, ... (at least 3 digits, more when needed)."""
    width = max(3, len(str(num_cases - 1)))
    return [f"case_{i:0{width}d}" for i in range(num_cases)]


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-max-magnitude smooth random field (X, Y, Z)."""
    field = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="reflect")
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)


STYLES = ("hippocampus", "edges")


@dataclass(frozen=True)
class _Contrast:
    """Intensities of one style before the per-case scale: background level and its smooth variation,
    the range of each part's mean, the bias-field strength and the noise (all in units of the clean image),
    and the partial-volume blur of the outlines (Gaussian sigma in voxels)."""

    background: float
    background_variation: float
    part1: tuple[float, float]
    part2: tuple[float, float]
    bias: float
    noise: float
    blur: float


_CONTRASTS = {
    "hippocampus": _Contrast(0.3, 0.08, (0.75, 0.85), (0.55, 0.65), 0.25, 0.04, 0.6),
    # Part 1 brighter and part 2 darker than the background: every outline, including the one between the
    # parts, is a step of >= 0.35 against noise 0.03, and the sign of the step tells the parts apart even
    # on a slice that shows one of them (the U-Net's instance norm removes absolute intensity).
    "edges": _Contrast(0.5, 0.03, (0.9, 1.0), (0.05, 0.15), 0.1, 0.03, 0.4),
}


def _image(label: np.ndarray, rng: np.random.Generator, style: str = "hippocampus") -> np.ndarray:
    """float32 (X, Y, Z) MR-like intensities for ``label`` in one of ``STYLES``."""
    look = _CONTRASTS[style]
    shape = label.shape
    sigma = max(shape) / 6.0
    background = look.background + look.background_variation * _smooth_field(shape, rng, sigma)
    means = np.array([0.0, rng.uniform(*look.part1), rng.uniform(*look.part2)])
    tissue = gaussian_filter(means[label], sigma=look.blur)  # partial-volume edges
    weight = gaussian_filter((label > 0).astype(np.float64), sigma=look.blur)
    clean = background * (1.0 - weight) + tissue
    bias = np.exp(look.bias * _smooth_field(shape, rng, max(shape) / 3.0))
    noisy = clean * bias + rng.normal(scale=look.noise, size=shape)
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
                        spacing: tuple[float, float, float] = (1.0, 0.8, 1.2), seed: int = 0, *,
                        style: str = "hippocampus") -> Path:
    """Write a synthetic MSD dataset to ``out_dir`` and return ``out_dir``.

    Writes ``dataset.json``, ``imagesTr/case_XXX.nii.gz`` (float32 (X, Y, Z) = ``shape``),
    ``labelsTr/case_XXX.nii.gz`` (uint8, values {0, 1, 2}) with affine diag(``spacing``) (mm), and
    ``splits.json`` with max(1, num_cases // 4) test cases. Deterministic given ``seed`` and ``style``
    (one of ``STYLES``: the labels are the same for both, only intensities differ).
    """
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES}")
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
    case_ids = _case_ids(num_cases)
    for case_id in case_ids:
        label = _toy_label(shape, rng)
        _save(_image(label, rng, style), spacing, out_dir / "imagesTr" / f"{case_id}.nii.gz")
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


def write_synthetic_ssl4mis(out_dir: Path, num_train: int = 4, num_val: int = 1, num_test: int = 1,
                            shape: tuple[int, int, int] = (12, 40, 32), seed: int = 0,
                            style: str = "hippocampus", class_names: bool = True) -> Path:
    """Write a synthetic dataset in SSL4MIS's 2D layout (see ``pipeline.data.ssl4mis``) and return ``out_dir``.

    Cases ``patientNNN_frame01`` with volumes (S, H, W) = ``shape`` (slice-first, as SSL4MIS's ACDC),
    the same toy organ as :func:`write_synthetic_msd` (label values {0, 1, 2}):

    - the ``num_train`` training cases as slice files only: ``data/slices/<case>_slice_<n>.h5`` with
      ``image`` float32 (H, W) and ``label`` uint8 (H, W), n = 0..S-1; ``train_slices.list`` lists them
      case by case in slice order, ``train.list`` the cases;
    - the ``num_val`` then ``num_test`` cases as volume files ``data/<case>.h5`` (``image`` float32
      (S, H, W), ``label`` uint8 (S, H, W)), listed in ``val.list`` / ``test.list``;
    - ``dataset.json`` with the class names (``class_names``; without it the h5 default {0, 1} applies).

    Images are min-max scaled to [0, 1] per volume, as SSL4MIS stores them. Deterministic given ``seed``.
    """
    import h5py

    if num_train < 1 or num_val < 0 or num_test < 0:
        raise ValueError(f"num_train={num_train} must be >= 1, num_val={num_val} and num_test={num_test} >= 0")
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES}")
    out_dir = Path(out_dir)
    (out_dir / "data" / "slices").mkdir(parents=True, exist_ok=True)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    rng = np.random.default_rng(seed)
    case_ids = [f"patient{i + 1:03d}_frame01" for i in range(num_train + num_val + num_test)]
    train, val, test = (case_ids[:num_train], case_ids[num_train:num_train + num_val],
                        case_ids[num_train + num_val:])
    slice_names = []
    for case_id in case_ids:
        label = _toy_label(shape, rng)
        image = _image(label, rng, style).astype(np.float64)
        image = ((image - image.min()) / max(float(image.max() - image.min()), 1e-12)).astype(np.float32)
        if case_id in train:
            for n in range(shape[0]):
                name = f"{case_id}_slice_{n}"
                with h5py.File(out_dir / "data" / "slices" / f"{name}.h5", "w") as f:
                    f.create_dataset("image", data=image[n], compression="gzip")
                    f.create_dataset("label", data=label[n], compression="gzip")
                slice_names.append(name)
        else:
            with h5py.File(out_dir / "data" / f"{case_id}.h5", "w") as f:
                f.create_dataset("image", data=image, compression="gzip")
                f.create_dataset("label", data=label, compression="gzip")
    for name, lines in (("train_slices", slice_names), ("train", train), ("val", val), ("test", test)):
        (out_dir / f"{name}.list").write_text("".join(f"{line}\n" for line in lines))
    if class_names:
        (out_dir / "dataset.json").write_text(json.dumps({"name": "SyntheticSSL4MIS", "labels": LABELS}, indent=1) + "\n")
    logger.info("wrote synthetic SSL4MIS dataset %s: %d training cases as slices, %d val and %d test volumes "
                "of shape %s", out_dir, num_train, num_val, num_test, shape)
    return out_dir


def write_synthetic_h5(out_dir: Path, num_cases: int = 8, shape: tuple[int, int, int] = (24, 40, 32),
                       seed: int = 0, spacing: tuple[float, float, float] | None = None) -> Path:
    """Write a synthetic dataset in the UA-MT h5 layout (``data.format: h5``) and return ``out_dir``.

    ``case_XXX.h5`` with datasets ``image`` (float32 (X, Y, Z) = ``shape``) and ``label`` (uint8, values
    {0, 1, 2}) for every case, the same toy organ as :func:`write_synthetic_msd`; ``dataset.json`` with the
    class names only; ``splits.json`` as :func:`write_synthetic_msd`. ``spacing`` (mm) is written as the
    file attribute ``spacing`` when given; without it the files carry none, like UA-MT's LA and
    Pancreas h5 files (distances are then in voxels). Deterministic given ``seed``.
    """
    import h5py

    if num_cases < 2:
        raise ValueError(f"num_cases={num_cases}: need at least 2 (one test, one training case)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    rng = np.random.default_rng(seed)
    case_ids = _case_ids(num_cases)
    for case_id in case_ids:
        label = _toy_label(shape, rng)
        with h5py.File(out_dir / f"{case_id}.h5", "w") as f:
            f.create_dataset("image", data=_image(label, rng))
            f.create_dataset("label", data=label)
            if spacing is not None:
                f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
    (out_dir / "dataset.json").write_text(json.dumps({"name": "SyntheticHippocampusH5", "labels": LABELS},
                                                     indent=1) + "\n")
    write_split_file(out_dir / "splits.json", case_ids, num_test=max(1, num_cases // 4))
    logger.info("wrote synthetic h5 dataset %s: %d cases of shape %s, spacing %s", out_dir, num_cases, shape,
                "none" if spacing is None else f"{spacing} mm")
    return out_dir
