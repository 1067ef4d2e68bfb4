"""Tables and pictures for people: per-round run summaries, store inspection, evaluation tables."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import StoreError
from pipeline.store import PseudoLabelStore, open_manifest

log = logging.getLogger(__name__)


def rounds_table(summaries) -> str:
    """One line per round of ``coordinator.RoundSummary``: test Dice/HD95/ASD and pseudo-label figures."""
    rows = []
    for s in summaries:
        row = {"round": s.round, "seconds": round(s.seconds, 1), "train_loss": s.train.get("loss")}
        row.update({f"test_{k}": v for k, v in s.test.items()})
        if s.relabel:
            row["pl_score"] = s.relabel["score_mean"]
            row["pl_agreement"] = s.relabel["agreement_dice"]
        row.update({f"audit_{k}": v for k, v in s.audit.items()})
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}")


def inspect_frame(store_root: Path) -> pd.DataFrame:
    """Per round: cases, slices, prompted slices, pseudo-label foreground fraction, generalist score
    distribution over prompted slices, and foreground Dice agreement with the specialist."""
    PseudoLabelStore(store_root)  # a clear error if this is not a store
    ddf = open_manifest(store_root)
    m = ddf[["round", "case_id", "num_prompts", "score_mean", "pseudo_fg_fraction", "specialist_fg_fraction",
             "agreement_dice", "embedding_cached"]].compute()
    rows = []
    for r, g in m.groupby("round"):
        p = g[g["num_prompts"] > 0]
        q = p["score_mean"].quantile([0.1, 0.5, 0.9]) if len(p) else pd.Series([np.nan] * 3, index=[0.1, 0.5, 0.9])
        rows.append({
            "round": int(r),
            "cases": g["case_id"].nunique(),
            "slices": len(g),
            "prompted": len(p),
            "pseudo_fg": g["pseudo_fg_fraction"].mean(),
            "specialist_fg": g["specialist_fg_fraction"].mean(),
            "score_mean": p["score_mean"].mean(),
            "score_p10": q[0.1],
            "score_p50": q[0.5],
            "score_p90": q[0.9],
            "agreement": p["agreement_dice"].mean(),
            "cached": f"{int(p['embedding_cached'].sum())}/{len(p)}",
        })
    return pd.DataFrame(rows)


def inspect_table(store_root: Path) -> str:
    df = inspect_frame(store_root)
    if df.empty:
        return f"{store_root}: no rounds yet"
    return df.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def _run_config(store_root: Path):
    from pipeline.config import load_config

    cfg_path = Path(store_root).parent / "config.yaml"
    return load_config(cfg_path) if cfg_path.exists() else None


def write_overlays(store_root: Path, out_dir: Path, num_slices: int = 6, round_index: int | None = None) -> list[Path]:
    """PNG pictures of the slices with the most pseudo-label foreground: image, specialist, pseudo-label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.data.dataset import load_image, read_dataset_info

    store = PseudoLabelStore(store_root)
    rounds = store.rounds()
    if not rounds:
        raise StoreError(f"store {store_root} has no rounds to draw")
    r = rounds[-1] if round_index is None else round_index
    m = store.manifest()
    m = m[(m["round"] == r) & (m["num_prompts"] > 0)].sort_values("pseudo_fg_fraction", ascending=False)
    cfg = _run_config(store_root)
    info = read_dataset_info(cfg.data.root, cfg.data.format) if cfg else None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, row in m.head(num_slices).iterrows():
        case = store.read_case(r, row["case_id"])
        s = int(row["slice"])
        if info is not None:
            image = np.moveaxis(load_image(info, row["case_id"], cfg.data.normalization)[0], store.slice_axis, 0)[s]
        else:
            image = np.zeros(case["pseudo_label"].shape[1:])
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        for ax, (title, lab) in zip(axes, [("image", None), ("specialist", case["specialist"][s]),
                                           (f"pseudo-label (score {row['score_mean']:.2f})", case["pseudo_label"][s])],
                                    strict=True):
            ax.imshow(image, cmap="gray")
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab, 0), cmap="autumn", alpha=0.5, vmin=0, vmax=max(store.class_ids))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{row['case_id']} slice {s} round {r}", fontsize=10)
        path = out_dir / f"round{r:03d}_{row['case_id']}_slice{s:03d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def eval_frame(run_dir: Path) -> pd.DataFrame:
    """Per round: mean Dice, Jaccard, HD95 (mm), ASD (mm) over test cases and classes, and Dice per class."""
    from pipeline.evaluation import round_means

    files = sorted((Path(run_dir) / "eval").glob("round_*.parquet"))
    if not files:
        raise StoreError(f"{run_dir} has no eval/round_*.parquet (has the run finished a round?)")
    rows = []
    for f in files:
        df = pd.read_parquet(f)
        rows.append({"round": int(df["round"].iloc[0]), "cases": df["case_id"].nunique(), **round_means(df)})
    return pd.DataFrame(rows)


def eval_table(run_dir: Path) -> str:
    return "distances in mm\n" + eval_frame(run_dir).to_string(index=False, float_format=lambda x: f"{x:.4f}")
