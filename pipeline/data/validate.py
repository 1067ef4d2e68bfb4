"""Checks of a dataset and a split before any work starts; every problem is collected and reported once.

Leak rule: the label files of unlabeled cases are never opened here unless
``check_unlabeled_labels=True`` (benchmark audits only), so a run's view of an unlabeled case is its
image alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.data.dataset import (
    DatasetInfo,
    label_values,
    load_image,
    load_label,
    read_dataset_info,
    read_image_shape,
    read_label_shape,
    spacing_recorded,
)
from pipeline.data.splits import Split
from pipeline.errors import DatasetError

logger = logging.getLogger(__name__)


def _orphan_problems(info: DatasetInfo) -> list[str]:
    images = info.root / "imagesTr"
    return [f"{path}: label file has no image (looked for {images}/<id>.nii.gz and <id>_0000.nii.gz)"
            for path in info.orphan_labels]


def _check_image(info: DatasetInfo, case_id: str, problems: list[str]) -> tuple[int, int, int] | None:
    """Header shape, then a full read for readability and finite values; None if unusable."""
    try:
        shape = read_image_shape(info, case_id)
        load_image(info, case_id, normalization="minmax")
    except DatasetError as e:
        problems.extend(e.problems)
        return None
    return shape


def _check_label(info: DatasetInfo, case_id: str, image_shape: tuple[int, int, int] | None,
                 problems: list[str]) -> None:
    """Label shape against the image's (header only), then values against ``info.labels``."""
    files = info.cases[case_id]
    try:
        shape = read_label_shape(info, case_id)
    except DatasetError as e:
        problems.extend(e.problems)
        return
    if image_shape is not None and shape != image_shape:
        problems.append(f"{files.label}: label shape {shape} does not match image shape {image_shape} "
                        f"of {files.image} (case {case_id!r})")
        return
    try:
        load_label(info, case_id)
    except DatasetError as e:
        problems.extend(e.problems)


def quiet_problems(info: DatasetInfo, split: Split, slice_axis: int | None = None) -> list[str]:
    """What does not stop a run but changes its numbers, one warning each: labeled or test cases whose label
    is all background (nothing to learn or measure), cases without a recorded spacing (distances in voxels),
    and for 3D h5 volumes the axis that is sliced (h5 files carry no orientation). Labels of unlabeled cases
    are never opened."""
    notes: list[str] = []
    for part, ids in (("labeled", split.labeled), ("test", split.test)):
        empty = []
        for c in ids:
            try:
                if info.cases[c].label is not None and not load_label(info, c).any():
                    empty.append(c)
            except (DatasetError, KeyError):  # reported as a problem by _problems
                continue
        if empty:
            notes.append(f"{len(empty)} {part} cases have an empty label (all background): {', '.join(empty[:5])}"
                         f"{' ...' if len(empty) > 5 else ''}; they teach or score background only: check the "
                         "label files, or leave the cases out of the split")
    if info.format != "msd":
        cases = [c for c in split.all_cases if c in info.cases]
        without = []
        for c in cases:
            try:
                if not spacing_recorded(info, c):
                    without.append(c)
            except DatasetError:
                continue
        if without:
            notes.append(f"{len(without)} of {len(cases)} cases record no voxel spacing (no 'spacing' attribute "
                         f"in their h5 file, e.g. {info.cases[without[0]].image}): 1 mm is assumed, so HD95 and "
                         "ASD are in voxels; add the attribute (3 numbers, mm) or read distances as voxels")
        volumes = [c for c in cases if not info.cases[c].slices]
        if volumes:
            shape = read_image_shape(info, volumes[0])
            axis = "data.slice_axis (default 0)" if slice_axis is None else f"data.slice_axis={slice_axis}"
            picked = "" if slice_axis is None else f": slices of {shape[slice_axis]} along axis {slice_axis}"
            notes.append(f"{len(volumes)} cases are 3D h5 volumes (e.g. {volumes[0]}, shape {shape}); h5 files "
                         f"carry no orientation, so a run slices them along {axis}{picked}; check it is the "
                         "axis across the slices you want (LA's mri_norm2.h5: axis 2)")
    return notes


def _problems(info: DatasetInfo, split: Split, check_unlabeled_labels: bool) -> list[str]:
    problems = _orphan_problems(info)
    role: dict[str, str] = {}
    for part, ids in (("labeled", split.labeled), ("test", split.test), ("unlabeled", split.unlabeled),
                      ("val", split.val)):
        for case_id in ids:
            if case_id in role:
                problems.append(f"split: case {case_id!r} is in both {role[case_id]} and {part}")
            elif case_id not in info.cases:
                problems.append(f"split: case {case_id!r} ({part}) is not in the dataset {info.root}")
            else:
                role[case_id] = part
    for case_id, part in role.items():
        files = info.cases[case_id]
        image_shape = _check_image(info, case_id, problems)
        if part in ("labeled", "test", "val"):
            if files.label is None:
                problems.append(f"{files.image}: {part} case {case_id!r} has no label file")
                continue
            _check_label(info, case_id, image_shape, problems)
        elif check_unlabeled_labels and files.label is not None:
            _check_label(info, case_id, image_shape, problems)
    return problems


def validate_cases(info: DatasetInfo, split: Split, check_unlabeled_labels: bool = False,
                   slice_axis: int | None = None) -> None:
    """Check every case of ``split`` and the dataset's orphan labels; one DatasetError lists all problems.

    Images of all split cases: exist, readable, one channel, finite. Labeled, validation and test cases: label
    exists, label shape == image shape, label values in ``info.labels``. Unlabeled cases: the label
    file is not opened unless ``check_unlabeled_labels`` (then an existing label is checked the same way).
    Labels without an image (``info.orphan_labels``) are problems: the dataset is broken.
    """
    problems = _problems(info, split, check_unlabeled_labels)
    if problems:
        raise DatasetError(problems)
    for note in quiet_problems(info, split, slice_axis):
        logger.warning("dataset %s: %s", info.root, note)
    logger.info("dataset check of %s: OK (%d labeled, %d unlabeled, %d validation, %d test cases%s)", info.root,
                len(split.labeled), len(split.unlabeled), len(split.val), len(split.test),
                "; unlabeled labels audited" if check_unlabeled_labels else "")


def validate_dataset(root: Path, format: str = "auto") -> DatasetInfo:
    """Read a dataset and check every case: all images, and every label file that exists.

    For ``semisam validate``; cases without a label are reported as unlabeled, not as problems. ``format``
    ``auto`` detects the layout (``DatasetInfo.layout`` says what was found). A set that names no classes
    (no dataset.json) but whose labels hold more than {0, 1} gets its classes from the label values, with a
    warning (:func:`labels_from_data`), as ``semisam run`` does.
    """
    info = read_dataset_info(Path(root), format)
    with_label = [c for c, f in info.cases.items() if f.label is not None]
    without = [c for c, f in info.cases.items() if f.label is None]
    split = Split(labeled=with_label, unlabeled=without, test=[])
    derived = labels_from_data(info, split)
    if derived is not None:
        warn_derived_labels(info, derived, len(with_label))
        info = read_dataset_info(Path(root), format, derived)
    problems = _problems(info, split, False)
    if problems:
        raise DatasetError(problems)
    for note in quiet_problems(info, split):
        logger.warning("dataset %s: %s", info.root, note)
    logger.info("dataset %s is valid: %d cases (%d labeled, %d unlabeled), classes %s", info.root,
                len(info.cases), len(with_label), len(without), info.labels)
    return info


def constant_slices(image, slice_axis: int):
    """bool (S,): the slices of image (X, Y, Z) along ``slice_axis`` whose voxels all hold one value."""
    import numpy as np

    flat = np.moveaxis(np.asarray(image), slice_axis, 0).reshape(image.shape[slice_axis], -1)
    return flat.max(1) == flat.min(1)


def warn_constant_images(volumes, role: str) -> list[str]:
    """Warn, naming each case, about images whose voxels all hold one value (blank or zeroed scans):
    they carry no anatomy; relabeling gives them no prompts (a background pseudo-label), training
    learns background from them. ``volumes``: objects with ``case_id`` and ``image``. Returns the ids."""
    import numpy as np

    blank = [v for v in volumes if np.ptp(v.image) == 0]
    for v in blank:
        logger.warning("%s case %s: the image is constant (every voxel %s): no anatomy to segment; it gets no "
                       "prompts and a background pseudo-label; check the file or leave the case out", role,
                       v.case_id, float(v.image.flat[0]))
    return [v.case_id for v in blank]


MAX_DERIVED_CLASS = 63
"""Label values above this are not taken as classes (an ignore mark such as 255 would make 256 classes)."""


def warn_derived_labels(info: DatasetInfo, derived: dict[int, str], n_cases: int) -> None:
    """The warning given when the classes were taken from the label values (:func:`labels_from_data`)."""
    logger.warning("%s has no dataset.json and data.labels is not set, but its labels hold the values 0..%d: "
                   "classes taken from the labels of %d cases, named %s; name them with data.labels in the "
                   "config or a dataset.json ({\"labels\": {\"0\": \"background\", \"1\": ...}})", info.root,
                   max(derived), n_cases, ", ".join(derived.values()))


def labels_from_data(info: DatasetInfo, split: Split) -> dict[int, str] | None:
    """Classes taken from the label values of the labeled and test cases, when the dataset names none (an h5
    or SSL4MIS folder without dataset.json, and no ``data.labels``) and its labels hold more than the
    default {0, 1}: {0: background, v: "class<v>"} for v = 1..max. None when the dataset's own labels apply.
    Labels of unlabeled cases are never opened."""
    meta = info.root / "dataset.json"
    if info.labels_from_config or info.format == "msd" or (meta.is_file() and "labels" in json.loads(meta.read_text())):
        return None
    values: set[int] = set()
    for case_id in [*split.labeled, *split.test]:
        try:
            values |= label_values(info, case_id)
        except Exception:  # noqa: BLE001 - an unreadable label is reported by validate_cases, with its file
            continue
    if not values or values <= set(info.labels) or min(values) < 0 or max(values) > MAX_DERIVED_CLASS:
        return None  # nothing to derive, or values that look like an ignore mark (255): validate_cases names them
    top = max(values)
    return {0: "background", **{v: f"class{v}" for v in range(1, top + 1)}}
