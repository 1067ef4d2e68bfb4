"""Segmentation metrics as the field reports them (medpy / SSL4MIS / nnU-Net), distances in millimetres
when the voxel spacing is known and in voxels when it is not.

Conventions, stated once and used by every function here:

* Masks are arrays of any dimension ``ndim >= 1``; anything non-zero counts as foreground. ``pred`` and
  ``ref`` must have the same shape (``ValueError`` naming both shapes otherwise).
* ``spacing`` is one positive float per array axis, in millimetres, **in the same axis order as the
  arrays** (for a ``(z, y, x)`` array pass ``(sz, sy, sx)``; NIfTI's ``header.get_zooms()`` is in the
  order of its own array axes).
* Surface of a mask: ``mask XOR binary_erosion(mask, S)`` with the **full-connectivity** structuring
  element ``S = scipy.ndimage.generate_binary_structure(ndim, ndim)`` (3x3x3 all ones in 3D), and
  background beyond the array border (``border_value=0``), so foreground on the array border is surface.
  A voxel is therefore surface iff it is foreground and any of its ``3**ndim - 1`` neighbours is not.
  (medpy's ``hd95``/``asd`` default to connectivity 1, where only the ``2 * ndim`` face neighbours
  count; that surface is thinner, so on curved or diagonal boundaries its distances can differ slightly
  from the ones here. Both give identical distances on axis-aligned boxes.)
* Surface distances go from voxel centre to voxel centre: ``scipy.ndimage.distance_transform_edt(
  ~ref_surface, sampling=spacing)`` read at the surface voxels of ``pred``, and vice versa.
* HD at percentile p (``hd95`` for p = 95, as medpy's ``hd95``): ``np.percentile`` (linear
  interpolation) of the **union** of both directed distance sets, pred->ref and ref->pred.
  p = 100 is the classical Hausdorff distance.
* ASD (average symmetric surface distance, Heimann et al. 2009): the mean of the **union** of both
  directed distance sets, i.e. ``(sum(d_pred_ref) + sum(d_ref_pred)) / (n_pred_surf + n_ref_surf)``.
  This differs from medpy's ``assd`` (mean of the two directed means) when the surfaces differ in size,
  and from SSL4MIS's use of medpy ``asd`` (the directed pred->ref mean only).
* Units: a table's distance columns carry their unit in their name, ``hd95_mm``/``asd_mm`` or
  ``hd95_vox``/``asd_vox`` (:func:`case_metrics` with ``spacing=None``: unit voxel steps, for data such as
  UA-MT's h5 files that store no spacing). Nothing in voxels is ever labelled mm.
* Empty masks: Dice and Jaccard are 1.0 when both masks are empty (nothing to find, nothing found) and
  0.0 when exactly one is. HD and ASD are undefined when either mask is empty and are returned as
  ``float("nan")``; :func:`summarize` averages with nan-means, so such cases drop out of the distance
  means (and are counted in ``n_nan_distance``) while still counting in Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

DISTANCE_UNITS: tuple[str, ...] = ("mm", "vox")
"""``mm`` when the spacing is known, ``vox`` (voxel steps) when it is not."""


def metric_columns(unit: str = "mm") -> tuple[str, ...]:
    """The columns of :func:`case_metrics` rows that :func:`summarize` averages, for a distance ``unit``."""
    if unit not in DISTANCE_UNITS:
        raise ValueError(f"distance unit {unit!r} is not one of {DISTANCE_UNITS}")
    return ("dice", "jaccard", f"hd95_{unit}", f"asd_{unit}")


METRIC_COLUMNS: tuple[str, ...] = metric_columns("mm")
"""The averaged columns of a table in millimetres (``metric_columns("vox")`` for one in voxels)."""


def distance_unit(columns) -> str:
    """The distance unit of a metrics table (or summary dict) from its column names (keys): ``mm`` or ``vox``.

    ValueError when it has distance columns of neither or of both units.
    """
    found = [u for u in DISTANCE_UNITS if f"hd95_{u}" in columns]
    if len(found) != 1:
        raise ValueError(f"metrics table needs hd95_mm or hd95_vox (one of them); it has {list(columns)}")
    return found[0]

MEAN_CLASS_ID = -1
"""``class_id`` of the row of :func:`summarize` that averages over classes."""


def _as_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as bool, after checking that their shapes agree."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape: pred {pred.shape} vs ref {ref.shape}")
    if pred.ndim < 1:
        raise ValueError("masks must have at least one dimension, got 0-d arrays")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _as_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """``spacing`` as a tuple of ``ndim`` positive finite floats (mm), else ValueError."""
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(values) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(values)} values but the masks have {ndim} axes")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be positive and finite (mm per voxel), got {values}")
    return values


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P| + |R|)`` of two masks of the same shape (any dimension).

    Returns a float in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    pred, ref = _as_pair(pred, ref)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index (IoU) ``|P∩R| / |P∪R|`` of two masks of the same shape (any dimension).

    Returns a float in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    pred, ref = _as_pair(pred, ref)
    union = int(np.count_nonzero(pred | ref))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & ref)) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    """Full-connectivity surface of a bool mask (``mask XOR erosion``), same shape, bool."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(pred -> ref, ref -> pred)``.

    Args:
        pred, ref: masks of the same shape ``(d0, ..., d{n-1})``, any ``n >= 1``.
        spacing: ``n`` voxel sizes in mm, same axis order as the arrays.

    Returns:
        ``d_pred_ref``: float64, shape ``(n_pred_surface,)``, for each surface voxel of ``pred`` (in C
        order) the Euclidean distance in mm to the nearest surface voxel of ``ref``; and ``d_ref_pred``,
        shape ``(n_ref_surface,)``, the same the other way round. Both are empty (shape ``(0,)``) when
        either mask is empty, since a distance to an empty surface is undefined.

    Surfaces use full connectivity (see the module docstring). The work is done on the bounding box of
    ``pred | ref``, which gives the same surfaces and distances as the full array: every foreground voxel
    on the box's edge is also surface in the full array, and the nearest surface voxel always lies inside.
    """
    pred, ref = _as_pair(pred, ref)
    sampling = _as_spacing(spacing, pred.ndim)
    empty = np.zeros(0, dtype=np.float64)
    if not pred.any() or not ref.any():
        return empty, empty.copy()
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    pred, ref = pred[box], ref[box]
    pred_surface = _surface(pred)
    ref_surface = _surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return (
        np.asarray(to_ref[pred_surface], dtype=np.float64),
        np.asarray(to_pred[ref_surface], dtype=np.float64),
    )


def hausdorff_percentile(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
) -> float:
    """Percentile Hausdorff distance in mm (medpy's ``hd95`` at the default 95).

    Defined as ``np.percentile(concat(d_pred_ref, d_ref_pred), percentile)`` (linear interpolation) over
    the union of both directed surface-distance sets of :func:`surface_distances`; ``percentile=100``
    is the classical (maximum) Hausdorff distance. ``float("nan")`` when either mask is empty
    (undefined). ``percentile`` must lie in [0, 100].
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    d_pred_ref, d_ref_pred = surface_distances(pred, ref, spacing)
    if d_pred_ref.size == 0 or d_ref_pred.size == 0:
        return float("nan")
    return float(np.percentile(np.concatenate([d_pred_ref, d_ref_pred]), float(percentile)))


def average_surface_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (ASD) in mm.

    Defined as the mean of the union of both directed distance sets of :func:`surface_distances`,
    ``(sum(d_pred_ref) + sum(d_ref_pred)) / (n_pred_surface + n_ref_surface)``. ``float("nan")`` when
    either mask is empty (undefined).
    """
    d_pred_ref, d_ref_pred = surface_distances(pred, ref, spacing)
    if d_pred_ref.size == 0 or d_ref_pred.size == 0:
        return float("nan")
    return float(np.concatenate([d_pred_ref, d_ref_pred]).mean())


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float] | None,
    class_ids: list[int],
    hd_percentile: float = 95.0,
) -> list[dict]:
    """Per-class metrics of one case.

    Args:
        pred_labels, ref_labels: integer label maps of the same shape ``(d0, ..., d{n-1})``; class ``c``
            is the mask ``labels == c``.
        spacing: ``n`` voxel sizes in mm, same axis order as the arrays; None when unknown: distances
            are then in voxel steps and their keys end in ``_vox`` instead of ``_mm``.
        class_ids: the classes to score, in the order of the returned rows (usually not background 0).
        hd_percentile: the percentile of :func:`hausdorff_percentile`; its value is stored under
            ``hd95_<unit>`` whatever the percentile (the column name is fixed).

    Returns:
        One dict per class: ``class_id`` (int), ``dice``, ``jaccard`` (floats in [0, 1]), ``hd95_mm``,
        ``asd_mm`` (floats in mm; ``hd95_vox``, ``asd_vox`` without spacing; NaN when either mask is
        empty), ``pred_voxels``, ``ref_voxels`` (ints, voxel counts of the class).

    Raises:
        ValueError: the shapes differ (the message names both), or the spacing does not fit.
    """
    pred_labels = np.asarray(pred_labels)
    ref_labels = np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(
            f"prediction and reference label maps must have the same shape: "
            f"pred {pred_labels.shape} vs ref {ref_labels.shape}"
        )
    unit = "vox" if spacing is None else "mm"
    sampling = (1.0,) * pred_labels.ndim if spacing is None else _as_spacing(spacing, pred_labels.ndim)
    rows: list[dict] = []
    for class_id in class_ids:
        pred = pred_labels == class_id
        ref = ref_labels == class_id
        rows.append(
            {
                "class_id": int(class_id),
                "dice": dice(pred, ref),
                "jaccard": jaccard(pred, ref),
                f"hd95_{unit}": hausdorff_percentile(pred, ref, sampling, hd_percentile),
                f"asd_{unit}": average_surface_distance(pred, ref, sampling),
                "pred_voxels": int(np.count_nonzero(pred)),
                "ref_voxels": int(np.count_nonzero(ref)),
            }
        )
    return rows


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per-class and over-class means of a table of :func:`case_metrics` rows.

    Args:
        df: one row per (case, class) with at least ``class_id`` and the metric columns ``dice``,
            ``jaccard``, ``hd95_mm``, ``asd_mm`` (or ``hd95_vox``, ``asd_vox``); other columns (case id,
            voxel counts) are ignored.

    Returns:
        A DataFrame with columns ``class_id, dice, jaccard, hd95_<unit>, asd_<unit>, n, n_nan_distance``
        (the unit of ``df``): one row per class (sorted by ``class_id``) holding the nan-mean of each metric
        over that class's rows, ``n`` its number of rows and ``n_nan_distance`` how many of them have an
        undefined (NaN) ``hd95``; then a last row ``class_id = -1`` ("mean") holding the nan-mean over the per-class
        means (each class weighs the same, as papers report the mean over classes), with ``n`` and
        ``n_nan_distance`` summed over classes. A metric that is NaN for every row of a class stays NaN.
    """
    metrics = list(metric_columns(distance_unit(df.columns)))
    missing = [c for c in ("class_id", *metrics) if c not in df.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}; it has {list(df.columns)}")
    columns = ["class_id", *metrics, "n", "n_nan_distance"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    values = df[["class_id", *metrics]].copy()
    values[metrics] = values[metrics].astype(float)
    grouped = values.groupby("class_id", sort=True)
    per_class = grouped[metrics].mean()  # pandas' mean skips NaN
    per_class["n"] = grouped.size()
    per_class["n_nan_distance"] = grouped[metrics[2]].apply(lambda s: int(s.isna().sum()))
    per_class = per_class.reset_index()
    mean_row = {"class_id": MEAN_CLASS_ID}
    for column in metrics:
        mean_row[column] = float(per_class[column].mean())
    mean_row["n"] = int(per_class["n"].sum())
    mean_row["n_nan_distance"] = int(per_class["n_nan_distance"].sum())
    out = pd.concat([per_class, pd.DataFrame([mean_row])], ignore_index=True)
    out["class_id"] = out["class_id"].astype(int)
    out["n"] = out["n"].astype(int)
    out["n_nan_distance"] = out["n_nan_distance"].astype(int)
    return out[columns]
