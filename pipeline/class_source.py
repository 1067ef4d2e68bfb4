"""Where each class's pseudo-label comes from: the generalist's mask or the specialist's own prediction.

A box cannot isolate every structure: LiteMedSAM prompted with a box around ACDC's myocardium (a ring
around the left-ventricle blood pool) returns the filled disk, Dice 0.03-0.13, while the same model gives
0.9+ on RV and LV. So each class has a source (``generalist.class_source``):

- ``generalist``: the generalist's mask, prompted from the specialist's prediction (SemiSAM);
- ``specialist``: the specialist's own argmax (self-training for that class; no prompt is made for it);
- ``auto``: decided each relabel round on *labeled cases the specialist was not trained on* (the
  selection cases, :func:`pipeline.data.splits.resolve_selection`): both are scored against the labels
  there with the round's checkpoint and the generalist is taken where its mean Dice beats the
  specialist's by more than ``generalist.auto_min_gain``. Without held-out labeled cases (a one-label
  run) the selection falls back to the labeled training cases, where the specialist's Dice is optimistic
  (it was trained on them): the generalist is then taken only where it beats the specialist on the
  specialist's own training data, a conservative rule. The choice and its numbers go to the manifest
  (``class_source``) and the round summary.

Composition of one slice (:func:`compose`): start from the specialist's map with the generalist-sourced
classes removed, then paint the generalist's masks of those classes over it. With ``generalist.overlap:
nested`` overlapping generalist masks are painted largest first, so a structure inside another (LV inside
the myocardium's box) keeps its own mask.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from pipeline.metrics import dice


def configured_sources(setting: str | dict, class_ids: list[int]) -> dict[int, str]:
    """Class id -> configured source (``generalist``/``specialist``/``auto``), from ``generalist.class_source``
    (one value for all, or a mapping by class id; a class it does not name takes ``generalist``)."""
    if isinstance(setting, str):
        return {int(c): setting for c in class_ids}
    return {int(c): str(setting.get(int(c), "generalist")) for c in class_ids}


def needs_selection(setting: str | dict, class_ids: list[int]) -> bool:
    return "auto" in configured_sources(setting, class_ids).values()


def generalist_classes(sources: dict[int, str] | None, class_ids: list[int]) -> list[int]:
    """The classes the generalist is prompted for (every class when ``sources`` is None)."""
    if sources is None:
        return list(class_ids)
    return [c for c in class_ids if sources.get(int(c), "generalist") == "generalist"]


def compose(specialist: np.ndarray, generalist_map: np.ndarray, from_generalist: list[int]) -> np.ndarray:
    """One label map from both sources: uint8 (..., H, W) specialist argmax and the generalist's merged map
    (values in {0} | from_generalist). Specialist voxels of generalist-sourced classes become background,
    then the generalist's masks are painted over."""
    if len(from_generalist) == 0:
        return specialist.astype(np.uint8, copy=True)
    out = np.where(np.isin(specialist, from_generalist), 0, specialist).astype(np.uint8)
    return np.where(generalist_map > 0, generalist_map, out).astype(np.uint8)


def selection_table(case_id: str, pseudo: np.ndarray, specialist: np.ndarray, label: np.ndarray,
                    class_ids: list[int], round_index: int) -> list[dict]:
    """Rows (round, case_id, class_id, generalist_dice, specialist_dice) of one selection case: the
    all-generalist pseudo-label and the specialist's map against the label, same shapes."""
    return [{"round": round_index, "case_id": case_id, "class_id": int(c),
             "generalist_dice": dice(pseudo == c, label == c), "specialist_dice": dice(specialist == c, label == c)}
            for c in class_ids]


def decide(configured: dict[int, str], table: pd.DataFrame | None, min_gain: float) -> tuple[dict[int, str], dict]:
    """(class -> ``generalist``/``specialist``, evidence) from the configured sources and, for ``auto``
    classes, the selection table (mean Dice over the selection cases; a class absent from a case and
    from both predictions counts 1.0 for both, as :func:`pipeline.metrics.dice` scores it). Evidence: class -> {generalist_dice, specialist_dice, cases}."""
    out: dict[int, str] = {}
    evidence: dict[int, dict] = {}
    for c, src in configured.items():
        if src != "auto":
            out[c] = src
            continue
        rows = table[table["class_id"] == c] if table is not None else None
        g = float(rows["generalist_dice"].mean()) if rows is not None and len(rows) else float("nan")
        s = float(rows["specialist_dice"].mean()) if rows is not None and len(rows) else float("nan")
        out[c] = "generalist" if np.isfinite(g) and np.isfinite(s) and g - s > min_gain else "specialist"
        evidence[c] = {"generalist_dice": round(g, 4), "specialist_dice": round(s, 4),
                       "cases": int(rows["case_id"].nunique()) if rows is not None else 0}
    return out, evidence


def as_json(sources: dict[int, str]) -> str:
    """The manifest's ``class_source`` column: ``{"1": "generalist", ...}``."""
    return json.dumps({str(c): s for c, s in sorted(sources.items())}, separators=(",", ":"))


def from_json(text: str) -> dict[int, str]:
    """The manifest's ``class_source`` column back as {class id: source} (the inverse of :func:`as_json`;
    "{}", as in parts written before per-class sources, is empty: every class from the generalist)."""
    return {int(c): s for c, s in json.loads(text or "{}").items()}


def describe(sources: dict[int, str], evidence: dict, names: dict[int, str]) -> str:
    """One log line: ``RV generalist (0.91 vs 0.72), MYO specialist (0.10 vs 0.55), ...``."""
    parts = []
    for c, s in sorted(sources.items()):
        e = evidence.get(c)
        nums = f" ({e['generalist_dice']:.3f} vs {e['specialist_dice']:.3f} on {e['cases']} cases)" if e else " (set)"
        parts.append(f"{names.get(c, f'class {c}')} {s}{nums}")
    return ", ".join(parts)
