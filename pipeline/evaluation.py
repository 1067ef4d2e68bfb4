"""Evaluation of the specialist on the test split, and the pseudo-label audit.

Metrics per case and foreground class: Dice, Jaccard, the 95th-percentile Hausdorff distance and the
average surface distance, both in millimetres from the image's voxel spacing (see ``pipeline.metrics``).

The audit (benchmarks only, ``eval.audit_pseudo_labels``) scores the stored pseudo-labels and the
specialist's own predictions against the hidden labels of unlabeled cases. It runs in the driver after
a relabel round; it reads labels that nothing else on the relabel or training path reads, and its
result goes to ``audit/round_XXX.parquet`` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.config import RunConfig
from pipeline.data.dataset import DatasetInfo, load_label
from pipeline.metrics import case_metrics, dice
from pipeline.models.inference import predict_volume
from pipeline.models.unet import UNet
from pipeline.store import PseudoLabelStore

log = logging.getLogger(__name__)


@dataclass
class EvalVolume:
    """A test case: image float32 (X, Y, Z), label uint8 (X, Y, Z), spacing in mm along X, Y, Z."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def evaluate_model(model: UNet, volumes: list[EvalVolume], cfg: RunConfig, class_ids: list[int],
                   device: torch.device) -> pd.DataFrame:
    """One row per (case, class): case_id, class_id, dice, jaccard, hd95_mm, asd_mm, pred/ref voxels."""
    rows = []
    for v in volumes:
        logits = predict_volume(model, v.image, cfg.data.slice_axis, tuple(cfg.model.patch_size), device)
        pred = logits.argmax(0).astype(np.uint8)
        for r in case_metrics(pred, v.label, v.spacing, class_ids, cfg.eval.hd_percentile):
            rows.append({"case_id": v.case_id, **r})
    return pd.DataFrame(rows)


METRIC_COLUMNS = ("dice", "jaccard", "hd95_mm", "asd_mm")


def _nanmean(values: pd.Series) -> float:
    return float(np.nanmean(values)) if len(values) and values.notna().any() else float("nan")


def round_means(df: pd.DataFrame, per_class: tuple[str, ...] = ("dice",)) -> dict[str, float]:
    """Mean over cases and classes (NaN distances skipped) of each metric: the per-round summary; and
    ``<metric>_class<id>``, the mean over cases, for the metrics in ``per_class``."""
    out = {c: _nanmean(df[c]) for c in METRIC_COLUMNS}
    for m in per_class:
        for cid, g in df.groupby("class_id"):
            out[f"{m}_class{cid}"] = _nanmean(g[m])
    return out


def audit_pseudo_labels(store: PseudoLabelStore, info: DatasetInfo, round_index: int, case_ids: list[str],
                        class_ids: list[int]) -> pd.DataFrame:
    """Per unlabeled case and class: Dice of the pseudo-label and of the specialist vs the hidden label."""
    rows = []
    for case_id in case_ids:
        stored = store.read_case(round_index, case_id)
        hidden = np.moveaxis(load_label(info, case_id), store.slice_axis, 0)
        for c in class_ids:
            rows.append({
                "round": round_index,
                "case_id": case_id,
                "class_id": c,
                "pseudo_dice": dice(stored["pseudo_label"] == c, hidden == c),
                "specialist_dice": dice(stored["specialist"] == c, hidden == c),
            })
    return pd.DataFrame(rows)
