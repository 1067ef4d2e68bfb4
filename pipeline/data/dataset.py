"""Finding and reading cases: MSD / nnU-Net v2 NIfTI folders and UA-MT style h5 files.

Arrays are returned as stored, axis order (X, Y, Z) = nibabel's voxel axes (i, j, k), with no
reorientation or resampling; spacing is in mm per voxel along those axes. Images come back as
float32 normalised per volume, labels as uint8 class values (0 = background).

Layouts:

- ``msd``: ``root/dataset.json`` (labels), ``root/imagesTr/<id>.nii.gz`` (or nnU-Net v2
  ``<id>_0000.nii.gz``), ``root/labelsTr/<id>.nii.gz``. An image without a label file is an
  unlabeled case; a label without an image is kept in ``DatasetInfo.orphan_labels`` (validation
  reports it).
- ``h5``: every ``root/**/*.h5`` is a case with dataset ``image`` and optionally ``label`` (LA's
  ``<id>/mri_norm2.h5`` takes its id from the folder). Labels default to {0: background, 1: foreground}
  unless ``root/dataset.json`` gives them.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipeline.data.case_ids import check_case_id
from pipeline.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

FORMATS = ("msd", "h5")
NORMALIZATIONS = ("zscore", "minmax")
_NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")
_LA_H5_NAME = "mri_norm2.h5"
_STD_FLOOR = 1e-6
# What a damaged file can raise while nibabel / gzip / h5py read it.
_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ImageFileError, HeaderDataError)

Spacing = tuple[float, float, float]


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. ``label`` is None when the case has no label (an unlabeled case).

    For h5 cases ``image`` and ``label`` are the same file (datasets ``image`` / ``label``).
    """

    case_id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """What is on disk, found without reading any voxel data.

    ``labels`` maps label value -> name (0 is background, values are 0..K-1); ``cases`` maps
    case id -> files, sorted by id; ``orphan_labels`` are label files whose image is missing.
    """

    root: Path
    format: str
    labels: dict[int, str]
    cases: dict[str, CaseFiles]
    orphan_labels: tuple[Path, ...] = ()

    @property
    def foreground_classes(self) -> list[int]:
        """Sorted label values except background 0."""
        return sorted(v for v in self.labels if v != 0)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    @property
    def labels_source(self) -> str:
        """Where the labels came from, for messages."""
        path = self.root / "dataset.json"
        if self.format == "msd" or path.is_file():
            return str(path)
        return "the h5 default {0: background, 1: foreground}"


# ---------------------------------------------------------------------------------------------- finding


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json does not exist (an MSD/nnU-Net dataset needs one)")
    try:
        tree = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(tree, dict):
        raise DatasetError(f"{path}: must hold a JSON object at the top level")
    return tree


def _is_int_text(key: object) -> bool:
    return isinstance(key, str) and re.fullmatch(r"\s*\d+\s*", key) is not None


def parse_labels(raw: object, source: Path) -> dict[int, str]:
    """Label value -> name from a dataset.json ``labels`` entry.

    Accepts MSD style ``{"0": "background", "1": "Anterior"}`` and nnU-Net v2 style
    ``{"background": 0, "hippo": 1}``. Values must be 0..K-1 (they index the model's classes).
    """
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{source}: 'labels' must be a non-empty object")
    if all(_is_int_text(k) for k in raw):
        labels = {int(k): str(v) for k, v in raw.items()}
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        if "ignore" in raw:
            raise DatasetError(f"{source}: the nnU-Net 'ignore' label is not supported")
        labels = {int(v): str(k) for k, v in raw.items()}
        if len(labels) != len(raw):
            raise DatasetError(f"{source}: 'labels' gives the same value to two names: {raw}")
    else:
        raise DatasetError(
            f"{source}: 'labels' must map values to names (MSD: {{\"0\": \"background\"}}) or names to "
            f"integer values (nnU-Net v2: {{\"background\": 0}}); region-based labels are not supported; got {raw}"
        )
    if sorted(labels) != list(range(len(labels))):
        raise DatasetError(f"{source}: label values must be 0..K-1 with 0 = background, got {sorted(labels)}")
    if len(labels) > 256:
        raise DatasetError(f"{source}: at most 256 label values are supported (labels are uint8)")
    return labels


def _nifti_stem(name: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _list_nifti(folder: Path) -> dict[str, list[Path]]:
    """Stem -> files (more than one when both .nii and .nii.gz exist). Hidden files are skipped."""
    out: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out
    skipped = []
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path.name)
        if path.name.startswith(".") or stem is None:
            skipped.append(path.name)
            continue
        out.setdefault(stem, []).append(path)
    if skipped:
        logger.warning("%s: ignoring %d hidden or non-NIfTI file(s), e.g. %s", folder, len(skipped), skipped[0])
    return out


def _checked_id(case_id: str, path: Path, problems: list[str]) -> bool:
    try:
        check_case_id(case_id)
    except ConfigError as e:
        problems.append(f"{path}: file name gives a bad case id: {e}")
        return False
    return True


def _read_msd(root: Path) -> DatasetInfo:
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path)
    if "labels" not in meta:
        raise DatasetError(f"{meta_path}: has no 'labels' entry")
    labels = parse_labels(meta["labels"], meta_path)
    channels = meta.get("channel_names", meta.get("modality"))
    if isinstance(channels, dict) and len(channels) > 1:
        raise DatasetError(f"{meta_path}: lists {len(channels)} channels {channels}; "
                           "multi-modal data is not supported yet")
    ending = meta.get("file_ending")
    if ending is not None and ending not in _NIFTI_ENDINGS:
        raise DatasetError(f"{meta_path}: file_ending {ending!r} is not supported (only .nii.gz / .nii)")

    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: folder of training images does not exist")
    images = _list_nifti(images_dir)
    label_files = _list_nifti(labels_dir)
    if not labels_dir.is_dir():
        logger.warning("%s does not exist: every case is unlabeled", labels_dir)
    problems: list[str] = []
    for paths in [*images.values(), *label_files.values()]:
        if len(paths) > 1:
            problems.append(f"{paths[0]}: also present as {paths[1].name}; keep one of them")

    # case id <- image stem: strip the nnU-Net channel suffix _0000 unless a label uses the full stem.
    id_of: dict[str, str] = {}
    stripped_bases: set[str] = set()
    for stem in images:
        m = _CHANNEL.match(stem)
        if m and m["channel"] == "0000" and stem not in label_files:
            id_of[stem] = m["base"]
            stripped_bases.add(m["base"])
    for stem, paths in images.items():
        m = _CHANNEL.match(stem)
        if stem in id_of:
            continue
        if m and m["base"] in stripped_bases:
            problems.append(f"{paths[0]}: nnU-Net channel {m['channel']} of case {m['base']}; "
                            "multi-modal data is not supported yet")
            continue
        id_of[stem] = stem

    cases: dict[str, CaseFiles] = {}
    for stem, case_id in sorted(id_of.items(), key=lambda kv: kv[1]):
        image = images[stem][0]
        if case_id in cases:
            problems.append(f"{image}: gives case id {case_id!r}, as does {cases[case_id].image}")
            continue
        if not _checked_id(case_id, image, problems):
            continue
        label = label_files.get(case_id, [None])[0]
        cases[case_id] = CaseFiles(case_id=case_id, image=image, label=label)
    if problems:
        raise DatasetError(problems)
    orphans = tuple(paths[0] for stem, paths in sorted(label_files.items()) if stem not in cases)
    return DatasetInfo(root=root, format="msd", labels=labels, cases=cases, orphan_labels=orphans)


def _read_h5_layout(root: Path) -> DatasetInfo:
    meta_path = root / "dataset.json"
    labels = {0: "background", 1: "foreground"}
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if "labels" in meta:
            labels = parse_labels(meta["labels"], meta_path)
    problems: list[str] = []
    cases: dict[str, CaseFiles] = {}
    files = [p for p in sorted(root.rglob("*.h5"))
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    for path in files:
        case_id = path.parent.name if path.name == _LA_H5_NAME else path.stem
        if case_id in cases:
            problems.append(f"{path}: gives case id {case_id!r}, as does {cases[case_id].image}")
            continue
        if not _checked_id(case_id, path, problems):
            continue
        try:
            with h5py.File(path, "r") as f:
                has_image, has_label = "image" in f, "label" in f
        except _READ_ERRORS as e:
            problems.append(f"{path}: unreadable or truncated h5 file ({type(e).__name__}: {e})")
            continue
        if not has_image:
            problems.append(f"{path}: h5 file has no 'image' dataset")
            continue
        cases[case_id] = CaseFiles(case_id=case_id, image=path, label=path if has_label else None)
    if problems:
        raise DatasetError(problems)
    if not cases:
        raise DatasetError(f"{root}: no .h5 files found")
    return DatasetInfo(root=root, format="h5", labels=labels, cases=dict(sorted(cases.items())))


def read_dataset_info(root: Path, format: str = "msd") -> DatasetInfo:
    """Find the cases and labels of a dataset folder; reads dataset.json and file listings only
    (h5: opens each file to see whether it has a ``label`` dataset, without reading it).

    Raises DatasetError listing every problem (missing/invalid dataset.json, bad case ids, two files
    for one case, multi-modal data), ConfigError for an unknown ``format``.
    """
    root = Path(root)
    if format not in FORMATS:
        raise ConfigError(f"data format {format!r} is not supported; use one of {FORMATS}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    info = _read_msd(root) if format == "msd" else _read_h5_layout(root)
    if not info.cases:
        raise DatasetError(f"{root / 'imagesTr'}: no .nii.gz / .nii images found")
    num_labeled = sum(c.label is not None for c in info.cases.values())
    logger.info("dataset %s (%s): %d cases, %d with labels, %d classes%s", root, format, len(info.cases),
                num_labeled, info.num_classes,
                f", {len(info.orphan_labels)} label(s) without image" if info.orphan_labels else "")
    return info


# ---------------------------------------------------------------------------------------------- reading


def _case(info: DatasetInfo, case_id: str) -> CaseFiles:
    try:
        return info.cases[case_id]
    except KeyError:
        raise DatasetError(f"case {case_id!r} is not in the dataset {info.root}") from None


def _unreadable(path: Path, e: BaseException) -> DatasetError:
    return DatasetError(f"{path}: unreadable or truncated file ({type(e).__name__}: {e})")


def _spatial_shape(shape: tuple[int, ...], path: Path, what: str) -> tuple[int, int, int]:
    """(X, Y, Z) from a stored shape; (X, Y, Z, 1) is accepted, more channels are not."""
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise DatasetError(f"{path}: {what} has {shape[3]} channels (shape {shape}); "
                           "multi-modal data is not supported yet")
    if len(shape) != 3:
        raise DatasetError(f"{path}: {what} must be a 3D volume, got shape {shape}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _nifti_header(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist")
    try:
        return nib.load(path)
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None


def _nifti_array(path: Path, what: str) -> tuple[np.ndarray, Spacing]:
    img = _nifti_header(path)
    _spatial_shape(tuple(img.shape), path, what)
    try:
        data = np.asanyarray(img.dataobj)  # full read: a truncated file fails here
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    zooms = img.header.get_zooms()[:3]
    spacing = (float(zooms[0]), float(zooms[1]), float(zooms[2])) if len(zooms) == 3 else (1.0, 1.0, 1.0)
    return data.reshape(data.shape[:3]), spacing


def _h5_read(path: Path, key: str, read):
    """``read(file, dataset)`` on h5 dataset ``key`` of ``path``; DatasetError naming the file otherwise."""
    if not path.is_file():
        raise DatasetError(f"{path}: file does not exist")
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DatasetError(f"{path}: h5 file has no {key!r} dataset")
            return read(f, f[key])
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None


def _h5_array(path: Path, key: str, what: str) -> tuple[np.ndarray, Spacing]:
    def read(f, ds):
        _spatial_shape(tuple(ds.shape), path, what)
        return np.asarray(ds[...]), f.attrs.get("spacing", ds.attrs.get("spacing"))

    data, raw_spacing = _h5_read(path, key, read)
    spacing: Spacing = (1.0, 1.0, 1.0)
    if raw_spacing is not None:
        values = np.asarray(raw_spacing, dtype=np.float64).ravel()
        if values.size != 3:
            raise DatasetError(f"{path}: attribute 'spacing' must hold 3 numbers, got {values.tolist()}")
        spacing = (float(values[0]), float(values[1]), float(values[2]))
    return data.reshape(data.shape[:3]), spacing


def read_image_shape(info: DatasetInfo, case_id: str) -> tuple[int, int, int]:
    """(X, Y, Z) of a case's image from the header only (no voxel data is read)."""
    return _header_shape(info, _case(info, case_id).image, "image", "image")


def read_label_shape(info: DatasetInfo, case_id: str) -> tuple[int, int, int]:
    """(X, Y, Z) of a case's label from the header only; DatasetError if the case has no label."""
    files = _case(info, case_id)
    if files.label is None:
        raise DatasetError(f"case {case_id!r} of {info.root} has no label file")
    return _header_shape(info, files.label, "label", "label")


def _header_shape(info: DatasetInfo, path: Path, key: str, what: str) -> tuple[int, int, int]:
    if info.format == "msd":
        return _spatial_shape(tuple(_nifti_header(path).shape), path, what)
    return _spatial_shape(_h5_read(path, key, lambda f, ds: tuple(ds.shape)), path, what)


def load_image(info: DatasetInfo, case_id: str, normalization: str = "zscore") -> tuple[np.ndarray, Spacing]:
    """A case's image as float32 (X, Y, Z), normalised per volume, and its spacing in mm (X, Y, Z).

    ``zscore``: (x - mean) / max(std, 1e-6) over the whole volume; ``minmax``: to [0, 1].
    Computed in float64 (raw MR values can reach ~1.7e6). Raises DatasetError naming the file for an
    unreadable/truncated file, more than one channel, non-finite voxels or a bad spacing.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization {normalization!r} is not supported; use one of {NORMALIZATIONS}")
    path = _case(info, case_id).image
    raw, spacing = _nifti_array(path, "image") if info.format == "msd" else _h5_array(path, "image", "image")
    x = np.asarray(raw, dtype=np.float64)
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DatasetError(f"{path}: image of case {case_id!r} has {bad} non-finite voxel(s) (NaN or inf)")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DatasetError(f"{path}: voxel spacing {spacing} must be positive")
    if normalization == "zscore":
        x = (x - x.mean()) / max(float(x.std()), _STD_FLOOR)
    else:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / max(hi - lo, _STD_FLOOR)
    return x.astype(np.float32), spacing


def load_label(info: DatasetInfo, case_id: str) -> np.ndarray:
    """A case's label as uint8 (X, Y, Z) of class values.

    Float-stored labels are rounded; raises DatasetError naming the file if the case has no label,
    the file is unreadable, values are not integers, or values are not in ``info.labels``.
    """
    files = _case(info, case_id)
    if files.label is None:
        raise DatasetError(f"case {case_id!r} of {info.root} has no label file")
    path = files.label
    raw, _ = _nifti_array(path, "label") if info.format == "msd" else _h5_array(path, "label", "label")
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise DatasetError(f"{path}: label of case {case_id!r} has non-finite values")
        rounded = np.rint(raw)
        if np.abs(raw - rounded).max(initial=0.0) > 1e-3:
            raise DatasetError(f"{path}: label of case {case_id!r} holds non-integer values")
        raw = rounded
    elif raw.dtype.kind not in "iub":
        raise DatasetError(f"{path}: label of case {case_id!r} has unsupported dtype {raw.dtype}")
    lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
    if lo < 0 or hi >= info.num_classes:
        values = np.unique(raw)
        unexpected = [int(v) for v in values if int(v) not in info.labels]
        raise DatasetError(f"{path}: label of case {case_id!r} has values {unexpected} that are not in the "
                           f"labels {sorted(info.labels)} of {info.labels_source}")
    return raw.astype(np.uint8)
