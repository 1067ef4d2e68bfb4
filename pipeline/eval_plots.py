"""Plots of a run's evaluation for ``semisam eval --png DIR``.

``dice_per_round.png``: left, the test Dice per round (mean over cases and classes, and per class);
right, when the run audited its pseudo-labels (``audit/round_NNN.parquet``), the Dice of the stored
pseudo-labels and of the specialist's own predictions against the hidden labels of the unlabeled cases,
per round: whether the generalist improved on the specialist that prompted it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.evaluation import audit_means
from pipeline.run_folder import RunFolder
from pipeline.storage import read_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlot:
    """The written file and the titles of its panels (for callers and tests)."""

    path: Path
    panels: tuple[str, ...]


def audit_frame(run_dir: str | Path) -> pd.DataFrame:
    """Per audited round: mean pseudo-label and specialist Dice over unlabeled cases and classes
    (columns ``round``, ``pseudo_dice``, ``specialist_dice``); empty when the run has no audit files."""
    rows = []
    for loc in RunFolder(run_dir).tables("audit"):  # a local path or a URL (s3://...), as every run-folder reader
        df = read_table(loc)
        if df.empty:
            continue
        means = audit_means(df)
        rows.append({"round": int(df["round"].iloc[0]), "pseudo_dice": means["pseudo_dice"],
                     "specialist_dice": means["specialist_dice"]})
    return pd.DataFrame(rows, columns=["round", "pseudo_dice", "specialist_dice"]).sort_values("round", kind="stable")


def write_eval_plots(run_dir: str | Path, out_dir: Path) -> EvalPlot:
    """Write ``out_dir/dice_per_round.png`` (see the module docstring); returns it and its panel titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.reports import class_label, eval_frame

    frame = eval_frame(run_dir)
    names = frame.attrs.get("class_names", {})
    test = frame.sort_values("round")
    audit = audit_frame(run_dir).sort_values("round")
    panels = ["test Dice per round"] + (["pseudo-label vs specialist Dice (audit)"] if len(audit) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.plot(test["round"], test["dice"], "o-", color="black", linewidth=2, label="mean")
    for column in sorted(c for c in test.columns if c.startswith("dice_class")):
        ax.plot(test["round"], test[column], "o--", linewidth=1, label=class_label(column, names))
    ax.set_title(panels[0], fontsize=10)
    if len(audit):
        ax2 = axes[0, 1]
        ax2.plot(audit["round"], audit["pseudo_dice"], "o-", color="#e6194b", label="pseudo-label")
        ax2.plot(audit["round"], audit["specialist_dice"], "s--", color="#4363d8", label="specialist")
        ax2.set_title(panels[1], fontsize=10)
    for a in axes[0]:
        a.set_xlabel("round")
        a.set_ylabel("Dice")
        a.set_ylim(0, 1)
        a.set_xticks(sorted(set(test["round"]) | set(audit["round"])))
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "dice_per_round.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return EvalPlot(path, tuple(panels))
