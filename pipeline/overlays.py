"""Overlay pictures of a pseudo-label store that explain a round: what the specialist predicted, which
prompts it gave the generalist, what the generalist made of them, and (when known) the truth.

For each chosen slice, one PNG with the panels, left to right:

- ``image``: the slice (normalised as in training), shown between its 0.5th and 99.5th percentiles;
- ``specialist``: its argmax label map, the prediction the prompts were taken from;
- ``pseudo-label``: the generalist's label map with the prompts drawn on it, per class: positive points
  (``+``), negative points (``x``) and the box (``XYXY``, inclusive pixels) in the class's colour; a
  prompted class whose mask came back empty is flagged in the title ("EMPTY mask", gated out of training);
- ``ground truth``: only when the case has a label file;
- ``uncertainty``: only when the store holds an ``uncertainty`` array for the case.

Plus one *summary sheet* per round (``sheets/round_NNN.png``): the chosen slices as rows and the same
panels as columns, under a line of the round's figures, to scan a round at a glance. Every picture has a
legend: each class's colour by its name (the dataset's), and the prompt marks.

Slices are picked among the prompted slices of a round (``PICKS``): ``disagreement`` (lowest Dice
between pseudo-label and specialist: where the generalist changed the most), ``lowest-score`` (lowest
generalist score), ``random`` and ``most-foreground`` (largest pseudo-label foreground fraction).

Only the store's public reading API (``PseudoLabelStore``: ``manifest``, ``read_case``, ``rounds``,
``class_ids``, ``slice_axis``) and the run's saved config are used; slices are ``(H, W)`` indexed
``[row, col]`` and points are ``(x, y)`` = ``(col, row)``, as everywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, StoreError
from pipeline.run_folder import RunFolder
from pipeline.store import PseudoLabelStore

log = logging.getLogger(__name__)

PICKS = ("disagreement", "lowest-score", "random", "most-foreground")
_CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
"""Colour of class k is entry (k - 1) mod 8; background is transparent."""


@dataclass(frozen=True)
class Overlay:
    """A written picture: its file, which slice (``case_id`` / ``slice`` / ``round``; None for a sheet)
    and the panel titles in drawing order (row-major for a sheet), for callers and tests."""

    path: Path
    round: int
    case_id: str | None
    slice: int | None
    panels: tuple[str, ...]
    grid: tuple[int, int]
    legend: tuple[str, ...] = ()
    """The legend's entries: each class's colour by name, then the prompt marks."""


# ---------------------------------------------------------------------------------------------- choosing


def pick_slices(manifest: pd.DataFrame, how: str, num: int, seed: int = 0) -> pd.DataFrame:
    """The ``num`` manifest rows to draw, among the prompted slices (``num_prompts > 0``), in drawing order.

    ``disagreement``: lowest ``agreement_dice`` first; ``lowest-score``: lowest ``score_mean`` first;
    ``most-foreground``: highest ``pseudo_fg_fraction`` first; ``random``: ``num`` rows drawn with
    ``np.random.default_rng(seed)``. NaN values go last; ties keep (case_id, slice) order.
    """
    if how not in PICKS:
        raise ConfigError(f"slice pick {how!r} is not one of {PICKS}")
    rows = manifest[manifest["num_prompts"] > 0].sort_values(["case_id", "slice"], kind="stable")
    if how == "random":
        take = np.random.default_rng(seed).choice(len(rows), size=min(num, len(rows)), replace=False)
        return rows.iloc[np.sort(take)]
    column, ascending = {"disagreement": ("agreement_dice", True), "lowest-score": ("score_mean", True),
                         "most-foreground": ("pseudo_fg_fraction", False)}[how]
    return rows.sort_values(column, ascending=ascending, kind="stable", na_position="last").head(num)


def parse_prompts(text: object) -> list[dict]:
    """The manifest's ``prompts`` JSON -> [{class_id, points_xy, point_labels, box_xyxy, mask_prompt}]."""
    if not isinstance(text, str) or not text:
        return []
    return list(json.loads(text))


# ---------------------------------------------------------------------------------------------- drawing


def _class_cmap(num_classes: int):
    from matplotlib.colors import ListedColormap

    return ListedColormap([_CLASS_COLOURS[k % len(_CLASS_COLOURS)] for k in range(max(num_classes, 1))])


def _class_colour(class_id: int) -> str:
    return _CLASS_COLOURS[(int(class_id) - 1) % len(_CLASS_COLOURS)]


def display_window(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """The grey-level window of a slice: its 0.5th to 99.5th percentiles, so that a few bright outliers (MR
    flow artefacts, a fat spot) do not leave the anatomy almost black, as a min-max window did."""
    lo, hi = (float(v) for v in np.percentile(image, percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def legend_entries(class_ids: list[int], names: dict[int, str]) -> list[tuple[str, dict]]:
    """(label, style) of the legend: one colour patch per class, by name, then the prompt marks."""
    entries = [(names.get(c, f"class {c}"), {"kind": "patch", "color": _class_colour(c)}) for c in class_ids]
    entries += [("positive point", {"kind": "mark", "marker": "+"}), ("negative point", {"kind": "mark", "marker": "x"}),
                ("box prompt", {"kind": "line", "linestyle": "--"})]
    return entries


def _add_legend(fig, entries: list[tuple[str, dict]]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    for label, st in entries:
        if st["kind"] == "patch":
            handles.append(Patch(facecolor=st["color"], alpha=0.6, label=label))
        elif st["kind"] == "mark":
            handles.append(Line2D([], [], marker=st["marker"], linestyle="", color="black", markersize=7, label=label))
        else:
            handles.append(Line2D([], [], linestyle=st["linestyle"], color="black", label=label))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.08))


def _draw_labels(ax, image: np.ndarray, labels: np.ndarray | None, max_class: int) -> None:
    lo, hi = display_window(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if labels is not None and labels.any():
        ax.imshow(np.ma.masked_equal(labels.astype(np.int32) - 1, -1), cmap=_class_cmap(max_class), alpha=0.45,
                  vmin=0, vmax=max(max_class - 1, 1), interpolation="nearest")


def draw_prompts(ax, prompts: list[dict]) -> None:
    """Positive points ``+``, negative points ``x`` and boxes (inclusive XYXY) of each class, in its colour."""
    from matplotlib.patches import Rectangle

    for p in prompts:
        colour = _class_colour(p["class_id"])
        xy = np.asarray(p.get("points_xy") or [], dtype=float).reshape(-1, 2)
        labels = np.asarray(p.get("point_labels") or [], dtype=int).reshape(-1)
        for mark, keep in (("+", labels == 1), ("x", labels == 0)):
            if keep.any():
                ax.plot(xy[keep, 0], xy[keep, 1], mark, color="white", markersize=7, markeredgewidth=2.6)
                ax.plot(xy[keep, 0], xy[keep, 1], mark, color=colour, markersize=6, markeredgewidth=1.4)
        box = p.get("box_xyxy")
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=colour,
                                   linewidth=1.4, linestyle="--"))


def _panels(row: pd.Series, arrays: dict, s: int, truth: np.ndarray | None,
            class_ids: list[int] | None = None, names: dict[int, str] | None = None) -> list[tuple[str, str, object]]:
    """(title, kind, data) per panel of one slice; kinds: image, labels, prompts, heat. A prompted class whose
    mask came back empty is flagged in the pseudo-label's title (training gates that slice out)."""
    score = row["score_mean"]
    agreement = row["agreement_dice"]
    title = f"pseudo-label + prompts\nscore {score:.2f}, agreement {agreement:.2f}"
    if class_ids:
        scores = np.asarray(arrays["scores"][s:s + 1], dtype=np.float32)
        empty = [c for k, c in enumerate(class_ids) if not np.isnan(scores[0, k]) and not (arrays["pseudo_label"][s] == c).any()]
        if empty:
            title += "\nEMPTY mask: " + ", ".join((names or {}).get(c, f"class {c}") for c in empty) + " (gated out)"
    panels: list[tuple[str, str, object]] = [
        ("image", "image", None),
        ("specialist", "labels", arrays["specialist"][s]),
        (title, "prompts", arrays["pseudo_label"][s]),
    ]
    if truth is not None:
        panels.append(("ground truth", "labels", truth))
    if arrays.get("uncertainty") is not None:
        panels.append(("uncertainty", "heat", np.asarray(arrays["uncertainty"][s], dtype=np.float32)))
    return panels


def _draw_panel(ax, kind: str, data, image: np.ndarray, prompts: list[dict], max_class: int) -> None:
    if kind == "heat":
        ax.imshow(data, cmap="magma", interpolation="nearest")
    else:
        _draw_labels(ax, image, None if kind == "image" else data, max_class)
        if kind == "prompts":
            draw_prompts(ax, prompts)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------- reading


class _SliceSource:
    """Images and labels of a run's cases as the store's slices (S, H, W), each case read once."""

    def __init__(self, store: PseudoLabelStore, store_root, round_index: int):
        self.store, self.round = store, round_index
        self.cfg = RunFolder.of_store(store_root).config_if_any()
        self.info = None
        if self.cfg is not None:
            from pipeline.data.dataset import read_data

            try:
                self.info = read_data(self.cfg.data)
            except Exception as e:  # pictures without the image are still worth drawing
                log.warning("overlays: cannot read the dataset %s (%s); drawing masks on a blank image",
                            self.cfg.data.root, e)
        else:
            log.warning("overlays: no config.yaml beside %s; drawing masks on a blank image", store_root)
        self.names: dict[int, str] = dict(self.info.labels) if self.info is not None else {}
        self._arrays: dict[str, dict] = {}
        self._images: dict[str, np.ndarray | None] = {}
        self._truth: dict[str, np.ndarray | None] = {}

    def arrays(self, case_id: str) -> dict:
        if case_id not in self._arrays:
            self._arrays[case_id] = self.store.read_case(self.round, case_id)
        return self._arrays[case_id]

    def image(self, case_id: str, s: int) -> np.ndarray:
        if case_id not in self._images:
            vol = None
            if self.info is not None:
                from pipeline.data.dataset import load_image

                vol = np.moveaxis(load_image(self.info, case_id, self.cfg.data.normalization)[0],
                                  self.store.slice_axis, 0)
            self._images[case_id] = vol
        vol = self._images[case_id]
        return np.zeros(self.arrays(case_id)["pseudo_label"].shape[1:], np.float32) if vol is None else vol[s]

    def truth(self, case_id: str, s: int) -> np.ndarray | None:
        """The case's label slice when it has a label file (inspection only: never used for training)."""
        if case_id not in self._truth:
            vol = None
            if self.info is not None and case_id in self.info.cases and self.info.cases[case_id].label is not None:
                from pipeline.data.dataset import load_label

                vol = np.moveaxis(load_label(self.info, case_id), self.store.slice_axis, 0)
            self._truth[case_id] = vol
        vol = self._truth[case_id]
        return None if vol is None else vol[s]


def _rounds_to_draw(store: PseudoLabelStore, store_root, round_index: int | None) -> list[int]:
    """[round_index], or every round of the store when None (the last one is drawn slice by slice)."""
    rounds = store.rounds()
    if not rounds:
        raise StoreError(f"store {store_root} has no rounds to draw")
    if round_index is None:
        return rounds
    if round_index not in rounds:
        raise StoreError(f"store {store_root} has no round {round_index}; it has rounds {rounds}")
    return [round_index]


def _chosen(store: PseudoLabelStore, store_root, r: int, pick: str, num: int, seed: int):
    """(manifest of round r, [(row, image slice, prompts, panels)] of the chosen slices)."""
    manifest = store.manifest()
    manifest = manifest[manifest["round"] == r]
    chosen = pick_slices(manifest, pick, num, seed)
    if chosen.empty:
        return manifest, []
    source = _SliceSource(store, store_root, r)
    rows = []
    for _, row in chosen.iterrows():
        case_id, s = str(row["case_id"]), int(row["slice"])
        panels = _panels(row, source.arrays(case_id), s, source.truth(case_id, s), store.class_ids, source.names)
        rows.append((row, source.image(case_id, s), parse_prompts(row["prompts"]), panels))
    return manifest, rows


def _class_names(store_root) -> dict[int, str]:
    """Class value -> name from the run's dataset (dataset.json or data.labels); {} when not readable."""
    return _SliceSource(PseudoLabelStore(store_root), store_root, 0).names


# ---------------------------------------------------------------------------------------------- writing


def draw_overlays(store_root, out_dir: Path, num_slices: int = 6, round_index: int | None = None,
                  pick: str = "disagreement", seed: int = 0) -> list[Overlay]:
    """One PNG per chosen slice of a round (``round_index``, default the last) and a summary sheet of that
    round (of every round when ``round_index`` is None).

    Files: ``out_dir/roundRRR_<case>_sliceSSS.png`` and ``out_dir/sheets/round_RRR.png``. Returns what was
    written: the slice pictures, then the sheets in round order (a round without prompted slices has none).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = PseudoLabelStore(store_root)
    rounds = _rounds_to_draw(store, store_root, round_index)
    max_class = max(store.class_ids) if store.class_ids else 1
    entries = legend_entries(store.class_ids, _class_names(store_root))
    legend = tuple(label for label, _ in entries)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Overlay] = []
    sheets: list[Overlay] = []
    rows: list = []
    for r in rounds:
        manifest, rows = _chosen(store, store_root, r, pick, num_slices, seed)
        if not rows:
            log.warning("round %d has no prompted slice: nothing to draw", r)
            continue
        sheets.append(_write_sheet(rows, r, pick, max_class, manifest, out_dir / "sheets", entries))
    r = rounds[-1]  # ``rows`` are the last round's: drawn one picture per slice
    for row, image, prompts, panels in rows:
        case_id, s = str(row["case_id"]), int(row["slice"])
        fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), squeeze=False)
        for ax, (title, kind, data) in zip(axes[0], panels, strict=True):
            _draw_panel(ax, kind, data, image, prompts, max_class)
            ax.set_title(title, fontsize=8)
        fig.suptitle(f"{case_id}  slice {s}  round {r}  (picked by {pick})", fontsize=10, y=1.06)
        _add_legend(fig, entries)
        path = out_dir / f"round{r:03d}_{case_id}_slice{s:03d}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(Overlay(path, r, case_id, s, tuple(t.split("\n")[0] for t, _, _ in panels),
                               (1, len(panels)), legend))
    return written + sheets


def _write_sheet(rows: list, r: int, pick: str, max_class: int, manifest: pd.DataFrame, out_dir: Path,
                 entries: list[tuple[str, dict]]) -> Overlay:
    """The round's summary sheet: one row per chosen slice, one column per panel kind."""
    import matplotlib.pyplot as plt

    columns: list[str] = []
    for *_, panels in rows:
        for title, _, _ in panels:
            head = title.split("\n")[0]
            if head not in columns:
                columns.append(head)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.5 * len(rows) + 0.8),
                             squeeze=False)
    titles = []
    for i, (row, image, prompts, panels) in enumerate(rows):
        by_head = {t.split("\n")[0]: (t, kind, data) for t, kind, data in panels}
        for j, head in enumerate(columns):
            ax = axes[i, j]
            if head not in by_head:
                ax.axis("off")
                ax.text(0.5, 0.5, f"no {head}", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                titles.append(f"no {head}")
                continue
            title, kind, data = by_head[head]
            _draw_panel(ax, kind, data, image, prompts, max_class)
            ax.set_title(title if i == 0 or "\n" in title else "", fontsize=7)
            titles.append(head)
        axes[i, 0].set_ylabel(f"{row['case_id']}\nslice {int(row['slice'])}", fontsize=8)
    prompted = manifest[manifest["num_prompts"] > 0]
    fig.suptitle(f"round {r}: {manifest['case_id'].nunique()} cases, {len(prompted)}/{len(manifest)} slices "
                 f"prompted, mean score {prompted['score_mean'].mean():.2f}, mean agreement "
                 f"{prompted['agreement_dice'].mean():.2f}; rows picked by {pick}", fontsize=10)
    _add_legend(fig, entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"round_{r:03d}.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Overlay(path, r, None, None, tuple(titles), (len(rows), len(columns)), tuple(label for label, _ in entries))


def write_overlays(store_root, out_dir: Path, num_slices: int = 6, round_index: int | None = None,
                   pick: str = "disagreement", seed: int = 0) -> list[Path]:
    """The files of :func:`draw_overlays` (slice pictures, then the round's summary sheet)."""
    return [o.path for o in draw_overlays(store_root, out_dir, num_slices, round_index, pick, seed)]
