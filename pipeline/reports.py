"""Tables and pictures for people: per-round run summaries, store inspection, evaluation tables."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import StoreError
from pipeline.oracle import banner as oracle_banner
from pipeline.round_summary import relabel_stats
from pipeline.run_folder import RunFolder
from pipeline.storage import read_table
from pipeline.store import PseudoLabelStore, open_manifest

log = logging.getLogger(__name__)


def rounds_table(summaries) -> str:
    """One line per round (:meth:`pipeline.round_summary.RoundSummary.row`): test Dice/HD95/ASD and
    pseudo-label figures."""
    return pd.DataFrame([s.row() for s in summaries]).to_string(index=False, float_format=lambda x: f"{x:.4f}")


def inspect_frame(store_root: Path) -> pd.DataFrame:
    """Per round: cases, slices, prompted slices, pseudo-label foreground fraction, generalist score
    distribution over prompted slices, foreground Dice agreement with the specialist, embeddings
    cached / prompted slices (``-`` for a generalist without embeddings: the random walker), and with a
    prompt ensemble its size and the mean uncertainty where any member says foreground."""
    if not PseudoLabelStore(store_root).parts():  # a clear error if this is not a store
        return pd.DataFrame()
    ddf = open_manifest(store_root)
    ensemble_cols = [c for c in ("ensemble", "fg_uncertainty") if c in ddf.columns]  # absent in older stores
    m = ddf[["round", "case_id", "slice", "num_prompts", "score_mean", "pseudo_fg_fraction", "specialist_fg_fraction",
             "agreement_dice", "embedding_cached", "generalist", *ensemble_cols]].compute()
    rows = []
    for r, g in m.groupby("round"):
        p = g[g["num_prompts"] > 0]
        stats = relabel_stats(g)
        q = p["score_mean"].quantile([0.1, 0.5, 0.9]) if len(p) else pd.Series([np.nan] * 3, index=[0.1, 0.5, 0.9])
        rows.append({
            "round": int(r),
            "cases": stats["cases"],
            "slices": stats["slices"],
            "prompted": stats["prompted_slices"],
            "pseudo_fg": g["pseudo_fg_fraction"].mean(),
            "specialist_fg": g["specialist_fg_fraction"].mean(),
            "score_mean": stats["score_mean"],
            "score_p10": q[0.1],
            "score_p50": q[0.5],
            "score_p90": q[0.9],
            "agreement": stats["agreement_dice"],
            "cached": _cached_text(p),
        })
        if "ensemble" in g and (g["ensemble"] > 1).any():  # a prompt ensemble: its size and spread
            rows[-1].update({"ensemble": int(g["ensemble"].max()), "fg_uncertainty": stats["fg_uncertainty"]})
    return pd.DataFrame(rows)


def _cached_text(prompted: pd.DataFrame) -> str:
    """``cached/prompted`` slices of a round, or ``-`` when its generalist has no embeddings to cache."""
    from pipeline.generalist.factory import has_embeddings

    if len(prompted) and not any(has_embeddings(g) for g in prompted["generalist"].unique()):
        return "-"
    return f"{int(prompted['embedding_cached'].sum())}/{len(prompted)}"


def inspect_table(store_root: Path) -> str:
    df = inspect_frame(store_root)
    mark = oracle_banner(RunFolder.of_store(store_root))
    head = f"{mark}\n" if mark else ""
    if df.empty:
        return f"{head}{store_root}: no rounds yet"
    return head + df.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def write_overlays(store_root, out_dir: Path, num_slices: int = 6, round_index: int | None = None,
                   pick: str = "disagreement", seed: int = 0) -> list[Path]:
    """Overlay pictures of a store (``pipeline.overlays``): per chosen slice of a round the image, the
    specialist, the pseudo-label with its prompts, the ground truth and uncertainty when known; and a
    summary sheet per round. Returns the files written."""
    from pipeline.overlays import write_overlays as _write_overlays

    return _write_overlays(store_root, out_dir, num_slices, round_index, pick, seed)


def eval_frame(run_dir: Path) -> pd.DataFrame:
    """Per round: mean Dice, Jaccard, HD95, ASD over test cases and classes (``hd95_mm``/``asd_mm``, or
    ``hd95_vox``/``asd_vox`` for data without spacing), how many case-class pairs had no distance
    (``hd95_nan``, ``asd_nan`` of ``pairs``), and Dice per class."""
    from pipeline.evaluation import round_means

    files = RunFolder(run_dir).tables("eval")
    if not files:
        raise StoreError(f"{run_dir} has no eval/round_*.parquet (has the run finished a round?)")
    rows, names = [], {}
    for f in files:
        df = read_table(f)
        rows.append({"round": int(df["round"].iloc[0]), "cases": df["case_id"].nunique(), **round_means(df)})
        if "class_name" in df:  # tables written before class names were recorded have none
            names.update(zip(df["class_id"].astype(int), df["class_name"].astype(str), strict=True))
    frame = pd.DataFrame(rows)
    val = _val_frame(RunFolder(run_dir))
    if not val.empty:
        frame = val.merge(frame, on="round", how="outer").sort_values("round", kind="stable").reset_index(drop=True)
    frame.attrs["class_names"] = names
    frame.attrs["best"] = RunFolder(run_dir).read_state().get("best")
    return frame


def _val_frame(folder: RunFolder) -> pd.DataFrame:
    """Per round with a validation table: ``val_cases``, ``val_dice`` and the validation HD95
    (``val_hd95_mm`` or ``val_hd95_vox``); empty for a run without a validation split."""
    from pipeline.evaluation import round_means

    rows = []
    for f in folder.val_tables():
        df = read_table(f)
        means = round_means(df)
        hd = next(k for k in means if k.startswith("hd95_") and k != "hd95_nan")
        rows.append({"round": int(df["round"].iloc[0]), "val_cases": df["case_id"].nunique(),
                     "val_dice": means["dice"], f"val_{hd}": means[hd]})
    return pd.DataFrame(rows)


def class_label(column: str, names: dict[int, str]) -> str:
    """``dice_class3`` -> ``LV`` when the run recorded class names, else ``class3``."""
    cid = int(column.rsplit("class", 1)[1])
    return names.get(cid, f"class{cid}")


def eval_table(run_dir: Path) -> str:
    """:func:`eval_frame` as text, headed by the distance unit (``mm``, or ``voxels`` without spacing)."""
    frame = eval_frame(run_dir)
    units = {u for u in ("mm", "vox") if f"hd95_{u}" in frame.columns}
    header = {frozenset({"mm"}): "distances in mm",
              frozenset({"vox"}): "distances in voxels (no voxel spacing known)"}.get(
        frozenset(units), "distances in mm (hd95_mm, asd_mm) and in voxels (hd95_vox, asd_vox)")
    names = frame.attrs.get("class_names", {})
    shown = frame.rename(columns={c: f"dice_{class_label(c, names)}" for c in frame.columns if c.startswith("dice_class")})
    best = frame.attrs.get("best")
    if "val_dice" in frame:  # validation beside test, the best round marked
        shown = shown.rename(columns={c: f"test_{c}" for c in shown.columns if c != "round" and not c.startswith("val_")})
        shown.insert(1, "best", ["*" if best and r == best["round"] else "" for r in frame["round"]])
        order = ["round", "best", *[c for c in shown.columns if c.startswith("val_")], "test_cases", "test_dice"]
        shown = shown[[*order, *[c for c in shown.columns if c not in order]]]
        footer = (f"best round by validation Dice: {best['round']} (validation Dice {best['val_dice']:.4f})"
                  if best else "best round: none recorded yet")
    else:
        footer = "no validation split: the best round is the last (semisam predict --round best takes it)"
    return header + "\n" + shown.to_string(index=False, float_format=lambda x: f"{x:.4f}") + "\n" + footer
