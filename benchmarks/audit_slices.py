"""Could a gate fix the pseudo-labels? Slice-level audit of one relabel round of a benchmark run.

    .venv/bin/python -m benchmarks.audit_slices runs/quality/k001-mean_teacher-semisam-s0 1

Reads the stored pseudo-labels and specialist predictions of the round and the hidden labels of the
unlabeled cases (the run must be on a dataset whose unlabeled cases have labels, as the benchmark split
does), then prints, for slices kept by a gate on the generalist score or on pseudo-label/specialist
agreement, the pooled Dice of the pseudo-labels and of the specialist against the hidden labels. A gate
can only help where the pseudo-labels beat the specialist on the slices it keeps. Slices without a prompt
have no score and fall outside every score gate here (training keeps them: their pseudo-label is the
specialist's own background). Also prints the pooled foreground (any class) Dice of both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.data.dataset import load_label, read_dataset_info
from pipeline.store import PseudoLabelStore
from pipeline.training.pseudo_labels import slice_scores


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """Pooled over classes: voxels labelled right (foreground), wrong-positive, missed."""
    tp = int(((pred == ref) & (ref > 0)).sum())
    fp = int(((pred > 0) & (pred != ref)).sum())
    fn = int(((ref > 0) & (pred != ref)).sum())
    return tp, fp, fn


def slice_table(run_dir: Path, round_index: int) -> tuple[pd.DataFrame, dict]:
    """One row per (case, slice): score, agreement and the pooled counts of pseudo-label and specialist."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    info = read_dataset_info(Path(cfg["data"]["root"]), cfg["data"].get("format", "msd"))
    store = PseudoLabelStore(run_dir / "pseudo_labels")
    cases = sorted(store.completed_cases(round_index))
    rows, fg = [], np.zeros((2, 3), np.int64)
    for case_id in cases:
        stored = store.read_case(round_index, case_id)
        hidden = np.moveaxis(load_label(info, case_id), store.slice_axis, 0)
        pseudo, spec = stored["pseudo_label"], stored["specialist"]
        scores = slice_scores(stored["scores"])
        for k, pred in enumerate((pseudo, spec)):
            fg[k] += _counts((pred > 0).astype(np.uint8), (hidden > 0).astype(np.uint8))
        for s in range(pseudo.shape[0]):
            p, q = pseudo[s] > 0, spec[s] > 0
            total = p.sum() + q.sum()
            rows.append({"case_id": case_id, "slice": s, "score": scores[s],
                         "agreement": 2 * (p & q).sum() / total if total else np.nan,
                         **dict(zip(("tp_p", "fp_p", "fn_p"), _counts(pseudo[s], hidden[s]), strict=True)),
                         **dict(zip(("tp_s", "fp_s", "fn_s"), _counts(spec[s], hidden[s]), strict=True))})
    fg_dice = {name: 2 * c[0] / max(1, 2 * c[0] + c[1] + c[2]) for name, c in zip(("pseudo", "specialist"), fg,
                                                                                   strict=True)}
    return pd.DataFrame(rows), fg_dice


def pooled_dice(df: pd.DataFrame, who: str) -> float:
    tp, fp, fn = (df[f"{k}_{who}"].sum() for k in ("tp", "fp", "fn"))
    return float(2 * tp / max(1, 2 * tp + fp + fn))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit_slices", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("round", type=int)
    args = p.parse_args(argv)
    df, fg = slice_table(args.run_dir, args.round)
    print(f"{df['case_id'].nunique()} cases, {len(df)} slices; foreground Dice: pseudo-labels "
          f"{fg['pseudo']:.3f}, specialist {fg['specialist']:.3f}")
    print("| gate | slices kept | pseudo-label Dice | specialist Dice |\n|---|---|---|---|")
    print(f"| none | 100% | {pooled_dice(df, 'p'):.3f} | {pooled_dice(df, 's'):.3f} |")
    for col, thresholds in (("score", (0.5, 0.6, 0.7, 0.75, 0.8)), ("agreement", (0.5, 0.7, 0.8, 0.9))):
        for t in thresholds:
            kept = df[df[col] >= t]
            if len(kept):
                print(f"| {col} >= {t} | {len(kept) / len(df):.0%} | {pooled_dice(kept, 'p'):.3f} | "
                      f"{pooled_dice(kept, 's'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
