"""Finding and reading cases: MSD / nnU-Net v2 NIfTI folders, UA-MT style h5 files, the SSL4MIS 2D layout.

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
- ``ssl4mis``: SSL4MIS's 2D layout (``pipeline.data.ssl4mis``): ``root/data/slices/<case>_slice_<n>.h5``
  (training, one slice a file) and ``root/data/<case>.h5`` (volumes); a case with slice files only is
  rebuilt by stacking them in slice order along axis 0. Labels as for ``h5``; the split can come from its
  ``train.list`` / ``train_slices.list`` / ``test.list`` / ``val.list`` (``DatasetInfo.split_lists``).
- ``auto``: one of the above, told from the file names (``pipeline.data.layout``).

h5 class names: both h5 layouts hold label *values* only. Their names come from ``root/dataset.json``
when it exists and has a ``labels`` entry (MSD style ``{"0": "background", "1": "LV"}`` or nnU-Net v2
style ``{"background": 0, "LV": 1}``); without it the labels are {0: background, 1: foreground}, and a
label with more values is reported with that hint.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipeline.data import ssl4mis
from pipeline.data.case_ids import check_case_id
from pipeline.data.layout import describe_folder, detect_layout
from pipeline.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

FORMATS = ("msd", "h5", "ssl4mis")
"""Layouts that can be read; ``auto`` (detect one of them) is accepted wherever a format is given."""
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

    For h5 cases ``image`` and ``label`` are the same file (datasets ``image`` / ``label``). A case
    rebuilt from SSL4MIS slice files lists them in ``slices`` (slice order); ``image`` is then the first
    of them, and ``label`` too when every slice file has a label.
    """

    case_id: str
    image: Path
    label: Path | None
    slices: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """What is on disk, found without reading any voxel data.

    ``labels`` maps label value -> name (0 is background, values are 0..K-1); ``cases`` maps
    case id -> files, sorted by id; ``orphan_labels`` are label files whose image is missing;
    ``split_lists`` maps an SSL4MIS list name (``train``, ``train_slices``, ``val``, ``test``) to its case
    ids; ``layout`` says what was found on disk, in words.
    """

    root: Path
    format: str
    labels: dict[int, str]
    cases: dict[str, CaseFiles]
    orphan_labels: tuple[Path, ...] = ()
    split_lists: dict[str, list[str]] = field(default_factory=dict)
    layout: str = ""
    labels_from_config: bool = False

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
        if self.labels_from_config:
            return "data.labels in the config"
        if self.format == "msd" or path.is_file():
            return str(path)
        return (f"the h5 default {{0: background, 1: foreground}} (no {path}; give one with "
                '{"labels": {"0": "background", "1": "...", ...}} to name more classes)')


# ---------------------------------------------------------------------------------------------- finding


def _layout_hint(root: Path) -> str:
    """What ``root`` looks like instead, for the error of a reader that found no data of its own layout."""
    try:
        layout = detect_layout(root)
    except DatasetError:
        return f"found {describe_folder(root)}"
    return (f"it looks like the {layout.found} (data.format: {layout.format} or auto; "
            f"semisam validate --format {layout.format})")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json does not exist (an MSD/nnU-Net dataset needs one); "
                           f"{_layout_hint(path.parent)}")
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
        raise DatasetError(f"{images_dir}: folder of training images does not exist; {_layout_hint(root)}")
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


def _h5_labels(root: Path) -> dict[int, str]:
    """Label value -> name of an h5 layout: from ``root/dataset.json`` when present, else {0, 1}."""
    meta_path = root / "dataset.json"
    labels = {0: "background", 1: "foreground"}
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if "labels" in meta:
            labels = parse_labels(meta["labels"], meta_path)
    return labels


def _h5_keys(path: Path, problems: list[str]) -> tuple[bool, bool] | None:
    """(has image, has label) of an h5 file without reading data; None (and a problem) if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return "image" in f, "label" in f
    except _READ_ERRORS as e:
        problems.append(f"{path}: unreadable or truncated h5 file ({type(e).__name__}: {e})")
        return None


def _read_h5_layout(root: Path) -> DatasetInfo:
    labels = _h5_labels(root)
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
        keys = _h5_keys(path, problems)
        if keys is None:
            continue
        has_image, has_label = keys
        if not has_image:
            problems.append(f"{path}: h5 file has no 'image' dataset")
            continue
        cases[case_id] = CaseFiles(case_id=case_id, image=path, label=path if has_label else None)
    if problems:
        raise DatasetError(problems)
    if not cases:
        raise DatasetError(f"{root}: no .h5 files found; {_layout_hint(root)}")
    return DatasetInfo(root=root, format="h5", labels=labels, cases=dict(sorted(cases.items())),
                       split_lists=ssl4mis.read_list_files(root))  # UA-MT keeps train.list/test.list at the root


def _slice_case(case_id: str, items: list[tuple[int, Path]], problems: list[str]) -> CaseFiles | None:
    """CaseFiles of a case rebuilt from its slice files; None (and problems) when a file is unusable."""
    numbers = [n for n, _ in items]
    if len(set(numbers)) != len(numbers):
        problems.append(f"{items[0][1].parent}: case {case_id!r} has two files for one slice number "
                        f"({sorted(n for n in set(numbers) if numbers.count(n) > 1)})")
        return None
    with_label = 0
    for _, path in items:
        keys = _h5_keys(path, problems)
        if keys is None:
            return None
        if not keys[0]:
            problems.append(f"{path}: h5 file has no 'image' dataset")
            return None
        with_label += keys[1]
    paths = tuple(p for _, p in items)
    if 0 < with_label < len(paths):
        problems.append(f"{paths[0].parent}: case {case_id!r}: {with_label} of its {len(paths)} slice files have "
                        "a 'label' dataset; give all of them one or none")
        return None
    return CaseFiles(case_id=case_id, image=paths[0], label=paths[0] if with_label else None, slices=paths)


def _read_ssl4mis(root: Path) -> DatasetInfo:
    labels = _h5_labels(root)
    problems = [f"{p}: not a slice file (SSL4MIS slice files are named <case>_slice_<n>.h5)"
                for p in ssl4mis.odd_slice_files(root)]
    cases: dict[str, CaseFiles] = {}
    volumes = ssl4mis.find_volume_files(root)
    slices = ssl4mis.find_slice_files(root)
    for case_id in sorted(set(volumes) | set(slices)):
        where = volumes.get(case_id) or slices[case_id][0][1]
        if not _checked_id(case_id, where, problems):
            continue
        if case_id in volumes:  # one file instead of one per slice; the same arrays
            keys = _h5_keys(volumes[case_id], problems)
            if keys is None:
                continue
            if not keys[0]:
                problems.append(f"{volumes[case_id]}: h5 file has no 'image' dataset")
                continue
            cases[case_id] = CaseFiles(case_id=case_id, image=volumes[case_id],
                                       label=volumes[case_id] if keys[1] else None)
        else:
            files = _slice_case(case_id, slices[case_id], problems)
            if files is not None:
                cases[case_id] = files
    lists = ssl4mis.read_list_files(root)  # ids not on disk are reported by the split check that uses them
    if problems:
        raise DatasetError(problems)
    if not cases:
        raise DatasetError(f"{root / 'data'}: no SSL4MIS .h5 files found; {_layout_hint(root)}")
    return DatasetInfo(root=root, format="ssl4mis", labels=labels, cases=cases, split_lists=lists)


_READERS = {"msd": _read_msd, "h5": _read_h5_layout, "ssl4mis": _read_ssl4mis}


def read_data(data) -> DatasetInfo:
    """:func:`read_dataset_info` of a ``DataConfig`` (root, format and its ``labels``, if given)."""
    return read_dataset_info(data.root, data.format, data.labels)


def read_dataset_info(root: Path, format: str = "auto", labels: dict[int, str] | None = None) -> DatasetInfo:
    """Find the cases and labels of a dataset folder; reads dataset.json and file listings only
    (h5, ssl4mis: opens each file to see whether it has a ``label`` dataset, without reading it).

    ``format``: one of ``FORMATS``, or ``auto`` to detect it (``pipeline.data.layout``); the layout found
    is logged and kept in ``DatasetInfo.layout``. Raises DatasetError listing every problem
    (missing/invalid dataset.json, bad case ids, two files for one case, multi-modal data; a folder in
    another layout than ``format`` says what it holds), ConfigError for an unknown ``format``.
    ``labels`` (value -> name, from ``data.labels``) replaces what the folder says of its classes: an h5
    folder without ``dataset.json`` (SSL4MIS ACDC) can name its classes without writing into the data.
    """
    root = Path(root)
    if format not in (*FORMATS, "auto"):
        raise ConfigError(f"data format {format!r} is not supported; use auto or one of {FORMATS}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if format == "auto":
        layout = detect_layout(root)
        format, found = layout.format, layout.found
        logger.info("dataset %s: detected the %s", root, found)
    else:
        found = f"{format} layout (as configured)"
    info = _READERS[format](root)
    if labels is not None:
        labels = parse_labels({str(k): v for k, v in labels.items()}, Path("data.labels"))
    if not info.cases:
        raise DatasetError(f"{root / 'imagesTr'}: no .nii.gz / .nii images found")
    num_labeled = sum(c.label is not None for c in info.cases.values())
    logger.info("dataset %s (%s): %d cases, %d with labels, %d classes%s", root, format, len(info.cases),
                num_labeled, len(labels or info.labels),
                f", {len(info.orphan_labels)} label(s) without image" if info.orphan_labels else "")
    return DatasetInfo(root=info.root, format=info.format, labels=labels or info.labels, cases=info.cases,
                       orphan_labels=info.orphan_labels, split_lists=info.split_lists, layout=found,
                       labels_from_config=labels is not None)


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


def _slice_stack(paths: tuple[Path, ...], key: str, what: str) -> tuple[np.ndarray, Spacing]:
    """Slice files, each a 2D ``key`` dataset (H, W), stacked in the given order -> (S, H, W); spacing
    from the first file's ``spacing`` attribute as for volumes, else 1 mm."""
    planes = []
    for path in paths:
        plane = _h5_read(path, key, lambda f, ds: np.asarray(ds[...]))
        if plane.ndim == 3 and plane.shape[0] == 1:
            plane = plane[0]
        if plane.ndim != 2:
            raise DatasetError(f"{path}: {what} of a slice file must be 2D (H, W), got shape {plane.shape}")
        if planes and plane.shape != planes[0].shape:
            raise DatasetError(f"{path}: {what} slice shape {plane.shape} differs from {planes[0].shape} of "
                               f"{paths[0]} (same case)")
        planes.append(plane)
    raw_spacing = _h5_read(paths[0], key, lambda f, ds: f.attrs.get("spacing", ds.attrs.get("spacing")))
    return np.stack(planes, axis=0), _parse_spacing(raw_spacing, paths[0])


def _parse_spacing(raw_spacing, path: Path) -> Spacing:
    spacing: Spacing = (1.0, 1.0, 1.0)
    if raw_spacing is not None:
        values = np.asarray(raw_spacing, dtype=np.float64).ravel()
        if values.size != 3:
            raise DatasetError(f"{path}: attribute 'spacing' must hold 3 numbers, got {values.tolist()}")
        spacing = (float(values[0]), float(values[1]), float(values[2]))
    return spacing


def _h5_array(path: Path, key: str, what: str) -> tuple[np.ndarray, Spacing]:
    def read(f, ds):
        _spatial_shape(tuple(ds.shape), path, what)
        return np.asarray(ds[...]), f.attrs.get("spacing", ds.attrs.get("spacing"))

    data, raw_spacing = _h5_read(path, key, read)
    return data.reshape(data.shape[:3]), _parse_spacing(raw_spacing, path)


def _case_array(info: DatasetInfo, files: CaseFiles, key: str) -> tuple[np.ndarray, Spacing]:
    """The ``key`` (image / label) array of a case (X, Y, Z) as stored, and its spacing, whatever the layout."""
    path = files.image if key == "image" else files.label
    assert path is not None
    if info.format == "msd":
        return _nifti_array(path, key)
    if files.slices:
        return _slice_stack(files.slices, key, key)
    return _h5_array(path, key, key)


def spacing_recorded(info: DatasetInfo, case_id: str) -> bool:
    """Whether a case's file records its voxel spacing (NIfTI always does; an h5 file needs a ``spacing``
    attribute, else 1 mm is assumed). Reads attributes only."""
    files = _case(info, case_id)
    if info.format == "msd":
        return True
    path = files.slices[0] if files.slices else files.image
    return bool(_h5_read(path, "image", lambda f, ds: "spacing" in f.attrs or "spacing" in ds.attrs))


def read_image_shape(info: DatasetInfo, case_id: str) -> tuple[int, int, int]:
    """(X, Y, Z) of a case's image from the header only (no voxel data is read)."""
    files = _case(info, case_id)
    if files.slices:
        return _stack_shape(files.slices, "image")
    return _header_shape(info, files.image, "image", "image")


def read_label_shape(info: DatasetInfo, case_id: str) -> tuple[int, int, int]:
    """(X, Y, Z) of a case's label from the header only; DatasetError if the case has no label."""
    files = _case(info, case_id)
    if files.label is None:
        raise DatasetError(f"case {case_id!r} of {info.root} has no label file")
    if files.slices:
        return _stack_shape(files.slices, "label")
    return _header_shape(info, files.label, "label", "label")


def _stack_shape(paths: tuple[Path, ...], key: str) -> tuple[int, int, int]:
    """(S, H, W) of slice files stacked, from the first file's dataset shape (no voxel data is read)."""
    shape = tuple(_h5_read(paths[0], key, lambda f, ds: tuple(ds.shape)))
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise DatasetError(f"{paths[0]}: {key} of a slice file must be 2D (H, W), got shape {shape}")
    return (len(paths), int(shape[0]), int(shape[1]))


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
    files = _case(info, case_id)
    path = files.image
    raw, spacing = _case_array(info, files, "image")
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


def label_values(info: DatasetInfo, case_id: str) -> set[int]:
    """The distinct (rounded) values of a case's label, whatever ``info.labels`` says (to derive classes)."""
    raw, _ = _case_array(info, _case(info, case_id), "label")
    return {int(v) for v in np.unique(np.rint(raw) if raw.dtype.kind == "f" else raw)}


def load_label(info: DatasetInfo, case_id: str) -> np.ndarray:
    """A case's label as uint8 (X, Y, Z) of class values.

    Float-stored labels are rounded; raises DatasetError naming the file if the case has no label,
    the file is unreadable, values are not integers, or values are not in ``info.labels``.
    """
    files = _case(info, case_id)
    if files.label is None:
        raise DatasetError(f"case {case_id!r} of {info.root} has no label file")
    path = files.label
    raw, _ = _case_array(info, files, "label")
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
