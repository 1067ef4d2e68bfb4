"""Evaluation of the specialist on the test split, and the pseudo-label audit.

Metrics per case and foreground class: Dice, Jaccard, the 95th-percentile Hausdorff distance and the
average surface distance (see ``pipeline.metrics``), in millimetres where the voxel spacing is known and
in voxels otherwise, the unit in the column name (``hd95_mm`` / ``hd95_vox``). Where spacing comes from
(:func:`distance_spacing`): MSD/NIfTI, the image header; h5, ``data.spacing``, else a ``spacing`` list in
``root/dataset.json``, else a ``spacing`` attribute of the h5 file, else none (UA-MT's own h5 files carry
none: their distances are in voxels, never passed off as mm).

The audit (benchmarks only, ``eval.audit_pseudo_labels``) scores the stored pseudo-labels and the
specialist's own predictions against the hidden labels of unlabeled cases. It runs in the driver after
a relabel round; it reads labels that nothing else on the relabel or training path reads, and its
result goes to ``audit/round_XXX.parquet`` only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from pipeline.config import DataConfig, RunConfig
from pipeline.data.dataset import DatasetInfo, load_label, read_dataset_info
from pipeline.errors import DatasetError
from pipeline.metrics import case_metrics, dice, distance_unit
from pipeline.models.inference import predict_volume
from pipeline.models.unet import UNet
from pipeline.store import PseudoLabelStore

log = logging.getLogger(__name__)


@dataclass
class EvalVolume:
    """A test case: image float32 (X, Y, Z), label uint8 (X, Y, Z), spacing in mm along X, Y, Z as the
    loader gave it (h5 files without spacing give 1, 1, 1: :func:`distance_spacing` decides what counts)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


Spacing = tuple[float, float, float]


def _three_positive(values, source: str) -> Spacing:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size != 3 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise DatasetError(f"{source}: spacing must be 3 positive numbers (mm along X, Y, Z), got {arr.tolist()}")
    return float(arr[0]), float(arr[1]), float(arr[2])


def dataset_json_spacing(root: Path) -> Spacing | None:
    """``spacing`` ([x, y, z] mm) of ``root/dataset.json`` when the file and the key exist, else None."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return None if "spacing" not in meta else _three_positive(meta["spacing"], str(path))


def has_spacing_attribute(path: Path) -> bool:
    """Whether an h5 file has a ``spacing`` attribute (on the file or its ``image`` dataset), which the
    loader then returns as the spacing. Reads attributes only: no voxel data, nothing of ``label``."""
    with h5py.File(path, "r") as f:
        return "spacing" in f.attrs or ("image" in f and "spacing" in f["image"].attrs)


def distance_spacing(data: DataConfig, volumes: list[EvalVolume]) -> dict[str, Spacing | None]:
    """Spacing (mm along X, Y, Z) of each volume for HD95/ASD, or None where it is unknown (distances in
    voxels). MSD: the NIfTI header's, as loaded. h5 / ssl4mis: ``data.spacing``, else ``dataset.json``'s
    ``spacing``, else the file's ``spacing`` attribute (as loaded), else None."""
    fmt, info = data.format, None
    if fmt == "auto":
        info = read_dataset_info(data.root, fmt, data.labels)
        fmt = info.format
    if fmt == "msd":
        return {v.case_id: v.spacing for v in volumes}
    given = tuple(data.spacing) if data.spacing is not None else dataset_json_spacing(data.root)
    if given is not None:
        return {v.case_id: given for v in volumes}
    info = info or read_dataset_info(data.root, fmt, data.labels)
    return {v.case_id: v.spacing if has_spacing_attribute(info.cases[v.case_id].image) else None for v in volumes}


def segment_volume(model: UNet, image: np.ndarray, cfg: RunConfig, device: torch.device) -> np.ndarray:
    """The specialist's label map uint8 (X, Y, Z) of class values for a normalised image float32 (X, Y, Z)
    (``pipeline.data.dataset.load_image``): slices along ``data.slice_axis`` (2D) or the sliding window
    (3D) of :func:`pipeline.models.inference.predict_volume`, then the argmax. What evaluation scores and
    ``semisam predict`` writes."""
    logits = predict_volume(model, image, cfg.data.slice_axis, tuple(cfg.model.patch_size), device)
    return logits.argmax(0).astype(np.uint8)


def evaluate_model(model: UNet, volumes: list[EvalVolume], cfg: RunConfig, class_ids: list[int],
                   device: torch.device) -> pd.DataFrame:
    """One row per (case, class): case_id, class_id, dice, jaccard, hd95_<unit>, asd_<unit>, pred/ref voxels.

    ``<unit>`` is ``mm`` when every test case has a known spacing and ``vox`` otherwise (then all cases
    are measured in voxels, so one table never mixes units); see :func:`distance_spacing`.
    """
    spacings = distance_spacing(cfg.data, volumes)
    known = all(s is not None for s in spacings.values())
    if not known:
        log.warning("no voxel spacing for %d of %d test cases (h5 without data.spacing): HD95/ASD in voxels",
                    sum(s is None for s in spacings.values()), len(spacings))
    rows = []
    for v in volumes:
        pred = segment_volume(model, v.image, cfg, device)
        spacing = spacings[v.case_id] if known else None
        for r in case_metrics(pred, v.label, spacing, class_ids, cfg.eval.hd_percentile):
            rows.append({"case_id": v.case_id, **r})
    return pd.DataFrame(rows)


METRICS = ("dice", "jaccard", "hd95", "asd")
"""Metric names of :func:`round_means`' ``per_class``; the distance ones get the table's unit suffix."""
METRIC_COLUMNS = METRICS  # the name benchmarks.quality imports


def _nanmean(values: pd.Series) -> float:
    return float(np.nanmean(values)) if len(values) and values.notna().any() else float("nan")


def round_means(df: pd.DataFrame, per_class: tuple[str, ...] = ("dice",)) -> dict[str, float]:
    """The per-round summary of an :func:`evaluate_model` table (rows: case x class).

    Keys: ``dice``, ``jaccard``, ``hd95_<unit>``, ``asd_<unit>`` (unit ``mm`` or ``vox``, as the table's
    columns): means over cases and classes, NaN distances skipped; ``hd95_nan`` and ``asd_nan``: how many
    of the ``pairs`` case-class pairs had an undefined distance (a class predicted or labelled empty) and
    were skipped; and ``<metric>_class<id>``, the mean over cases, for the metrics named in ``per_class``
    (from :data:`METRICS`).
    """
    unit = distance_unit(df.columns)
    column = {"dice": "dice", "jaccard": "jaccard", "hd95": f"hd95_{unit}", "asd": f"asd_{unit}"}
    out = {column[m]: _nanmean(df[column[m]]) for m in METRICS}
    out["hd95_nan"] = int(df[column["hd95"]].isna().sum())
    out["asd_nan"] = int(df[column["asd"]].isna().sum())
    out["pairs"] = len(df)
    for m in per_class:
        name = column.get(m, m)
        for cid, g in df.groupby("class_id"):
            out[f"{name}_class{cid}"] = _nanmean(g[name])
    return out


def audit_pseudo_labels(store: PseudoLabelStore, info: DatasetInfo, round_index: int, case_ids: list[str],
                        class_ids: list[int]) -> pd.DataFrame:
    """Per unlabeled case and class: Dice of the pseudo-label and of the specialist vs the hidden label.

    With a prompt ensemble (the case has an ``uncertainty`` array) also: ``pseudo_dice_certain`` and
    ``specialist_dice_certain``, the same Dice restricted to the voxels where every member agreed
    (uncertainty 0), and ``certain_fraction``, the share of the pseudo-label's class voxels that are
    certain (NaN when it has none). Without one these columns are NaN.
    """
    rows = []
    for case_id in case_ids:
        stored = store.read_case(round_index, case_id)
        hidden = np.moveaxis(load_label(info, case_id), store.slice_axis, 0)
        certain = None if stored["uncertainty"] is None else stored["uncertainty"] == 0
        for c in class_ids:
            pseudo_c, spec_c, hidden_c = stored["pseudo_label"] == c, stored["specialist"] == c, hidden == c
            row = {
                "round": round_index,
                "case_id": case_id,
                "class_id": c,
                "pseudo_dice": dice(pseudo_c, hidden_c),
                "specialist_dice": dice(spec_c, hidden_c),
                "pseudo_dice_certain": float("nan"),
                "specialist_dice_certain": float("nan"),
                "certain_fraction": float("nan"),
            }
            if certain is not None:
                row["pseudo_dice_certain"] = dice(pseudo_c & certain, hidden_c & certain)
                row["specialist_dice_certain"] = dice(spec_c & certain, hidden_c & certain)
                if pseudo_c.any():
                    row["certain_fraction"] = float(certain[pseudo_c].mean())
            rows.append(row)
    return pd.DataFrame(rows)


CERTAIN_COLUMNS = ("pseudo_dice_certain", "specialist_dice_certain", "certain_fraction")


def audit_means(audit: pd.DataFrame) -> dict:
    """The means of one round's :func:`audit_pseudo_labels` table, the one place they are taken.

    Keys: ``pseudo_dice`` and ``specialist_dice`` (over cases and classes); ``by_class`` {class id (str):
    {pseudo_dice, specialist_dice}}; with a prompt ensemble also the means of :data:`CERTAIN_COLUMNS`
    (NaN skipped). Empty for an empty table."""
    if audit.empty:
        return {}
    out = {"pseudo_dice": float(audit["pseudo_dice"].mean()), "specialist_dice": float(audit["specialist_dice"].mean())}
    out["by_class"] = {str(c): {k: float(g[k].mean()) for k in ("pseudo_dice", "specialist_dice")}
                       for c, g in audit.groupby("class_id")}
    for col in CERTAIN_COLUMNS:  # a prompt ensemble: Dice where all members agree
        if col in audit and audit[col].notna().any():
            out[col] = float(audit[col].mean())
    return out
