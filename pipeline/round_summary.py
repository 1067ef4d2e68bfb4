"""What one round did, in numbers: the relabel statistics of a round's manifest and the round summary.

The relabel statistics (:func:`relabel_stats`) are taken here and nowhere else: the coordinator's round
summary, ``semisam inspect`` (:func:`pipeline.reports.inspect_frame`) and TensorBoard read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd


def relabel_stats(manifest: pd.DataFrame) -> dict:
    """Statistics of one round's manifest rows (one row per case x slice, see :mod:`pipeline.store`).

    ``cases``, ``slices``; ``prompted_slices`` (slices with at least one prompt) and, over those,
    ``cached_slices`` (embedding read from the cache), the means ``score_mean`` (the generalist's score),
    ``agreement_dice`` (pseudo-label vs specialist foreground Dice) and ``fg_uncertainty`` (prompt
    ensembles; NaN without). Means are NaN when no slice was prompted. The rows are taken in (case, slice)
    order, so the sums, and the last digits of the means, do not depend on the order in which the SAM actors
    returned their cases."""
    manifest = manifest.sort_values(["case_id", "slice"], kind="stable")
    prompted = manifest[manifest["num_prompts"] > 0]

    def mean(column: str) -> float:
        return float(prompted[column].mean()) if len(prompted) and column in prompted else float("nan")

    return {
        "cases": int(manifest["case_id"].nunique()),
        "slices": len(manifest),
        "prompted_slices": len(prompted),
        "cached_slices": int(prompted["embedding_cached"].sum()),
        "score_mean": mean("score_mean"),
        "agreement_dice": mean("agreement_dice"),
        "fg_uncertainty": mean("fg_uncertainty"),
    }


@dataclass
class RoundSummary:
    """One round: seconds, training statistics, relabel statistics (:func:`relabel_stats` and the round's
    bookkeeping), test means (:func:`pipeline.evaluation.round_means`), the pseudo-label audit
    (:func:`pipeline.evaluation.audit_means`) and the parts' wall times. Kept in state.json; ``line`` is the
    log line."""

    round: int
    seconds: float
    train: dict = field(default_factory=dict)
    relabel: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    """Wall seconds of the round's parts: ``relabel_s`` (with its audit), ``train_s`` (training and
    publishing, or restoring a published checkpoint), ``eval_s``; in an overlapped round the first two ran
    at the same time."""
    val: dict = field(default_factory=dict)
    """Validation means (:func:`pipeline.evaluation.round_means` on the validation split; empty without one):
    they choose the best round (:func:`best_round`)."""

    def line(self) -> str:
        parts = [f"round {self.round}", *_relabel_parts(self.relabel),
                 f"train loss {self.train.get('loss', float('nan')):.4f}",
                 *([f"val Dice {self.val['dice']:.4f}"] if self.val else []), *_test_parts(self.test),
                 *_audit_parts(self.audit), f"{self.seconds:.1f} s"]
        return " | ".join(parts)

    def row(self) -> dict:
        """The summary as one flat table row (``semisam run``'s closing table)."""
        row = {"round": self.round, "seconds": round(self.seconds, 1), "train_loss": self.train.get("loss")}
        if self.val:
            row["val_dice"] = self.val.get("dice")
        row.update({f"test_{k}": v for k, v in self.test.items()})
        if self.relabel:
            row["pl_score"] = self.relabel["score_mean"]
            row["pl_agreement"] = self.relabel["agreement_dice"]
        row.update({f"audit_{k}": v for k, v in self.audit.items()})
        return row


def _relabel_parts(r: dict) -> list[str]:
    if not r:
        return []
    cached = (f"cached embeddings {r['cached_slices']}/{r['prompted_slices']}"
              if r.get("cacheable", True) else "no embeddings (weight-free generalist)")
    parts = [f"relabel {r['cases']} cases/{r['slices']} slices, score {r['score_mean']:.3f}, {cached}"]
    if r.get("ensemble", 1) > 1:
        parts.append(f"{r['ensemble']}-member prompt ensemble, foreground uncertainty {r['fg_uncertainty']:.3f}")
    if r.get("failed_cases"):
        parts.append(f"{len(r['failed_cases'])} cases given up")
    if "trained_in_round" in r:
        parts.append(f"for round {r['trained_in_round']} (overlapped)")
    if r.get("class_source"):
        parts.append("class sources " + ", ".join(f"{c}: {s}" for c, s in r["class_source"].items()))
    return parts


def _test_parts(test: dict) -> list[str]:
    if not test:
        return []
    unit = "vox" if "hd95_vox" in test else "mm"
    hd, asd = test.get(f"hd95_{unit}", math.nan), test.get(f"asd_{unit}", math.nan)
    nan = f" ({test['hd95_nan']}/{test['pairs']} pairs without distance)" if "pairs" in test else ""
    return [f"test Dice {test['dice']:.4f} HD95 {hd:.2f} {unit} ASD {asd:.2f} {unit}{nan}"]


def _audit_parts(audit: dict) -> list[str]:
    if not audit:
        return []
    parts = [f"audit pseudo Dice {audit['pseudo_dice']:.4f} vs specialist {audit['specialist_dice']:.4f}"]
    if len(audit.get("by_class", {})) > 1:
        parts.append("per class " + ", ".join(f"{c}: {v['pseudo_dice']:.3f} vs {v['specialist_dice']:.3f}"
                                              for c, v in audit["by_class"].items()))
    if "pseudo_dice_certain" in audit:
        parts.append(f"on certain voxels {audit['pseudo_dice_certain']:.4f} vs {audit['specialist_dice_certain']:.4f} "
                     f"({audit['certain_fraction']:.3f} of the pseudo-label certain)")
    return parts


def best_round(summaries: list[dict]) -> dict | None:
    """The best round by validation Dice: ``{"round", "val_dice", "test_dice"}`` (``test_dice`` NaN when the
    round was not tested; it is recorded, never compared), the earliest of equal ones; None when no round
    has a validation Dice (no validation split: the last round is then the one to use). ``summaries``:
    :class:`RoundSummary` dicts as kept in state.json."""
    scored = [s for s in summaries if s.get("val") and not math.isnan(s["val"].get("dice", math.nan))]
    if not scored:
        return None
    best = max(scored, key=lambda s: (s["val"]["dice"], -s["round"]))
    return {"round": best["round"], "val_dice": best["val"]["dice"],
            "test_dice": best.get("test", {}).get("dice", math.nan)}
