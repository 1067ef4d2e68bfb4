"""The SemiSAM question asked with a real generalist: LiteMedSAM on ACDC and MSD Hippocampus.

    .venv/bin/python -m benchmarks.generalist_quality --sets acdc3 --rows mean_teacher best --seeds 0
    .venv/bin/python -m benchmarks.generalist_quality --report

Sets (``SETS``): ``acdc3``/``acdc7`` are ``conf/acdc.yaml`` with 3 or 7 labeled patients (the SSL4MIS
protocol: the first 6 or 14 frames of train.list = the first 68 or 136 lines of train_slices.list),
tested on the 40 test.list volumes, distances in voxels; ``hippo1``/``hippo4`` are
``conf/hippocampus.yaml`` with k = 1 or 4 and LiteMedSAM instead of the random walker. Rows (``ROWS``):
supervised, Mean Teacher, UA-MT, MT + the SemiSAM term in its published form and in the strong form,
``best``: the strong term with per-class sources decided on held-out labeled cases (``auto``) and
nested overlaps, and ``best_gated``: ``best`` learning only the voxels of the generalist's classes
(``train.pseudo_label.generalist_voxels_only``). Every row of a set has the same budget (``BUDGET``); every cell shares one embedding
cache, so the encoder runs once per slice for the whole matrix.

Cells reuse :mod:`benchmarks.quality` (``run_cell``: a normal run, its final test metrics, the per-round
per-class audit of the pseudo-labels against the hidden labels). Results: one JSON per cell in
``benchmarks/results/quality_lite/``; ``--report`` aggregates them, pairs rows seed by seed
(``paired_differences``) and writes ``benchmarks/results/quality_lite.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import benchmarks.quality as q  # the hippocampus matrix: its row overrides are reused
from benchmarks.common import FIGURES, RESULTS, ROOT, SHARED, setup_logging
from benchmarks.quality import (
    _PL,
    _STRONG,
    aggregate,
    load_cells,
    paired_differences,
    paired_markdown,
    run_cell,
)
from pipeline.atomic import atomic_write_text
from pipeline.config import load_config

log = logging.getLogger("benchmarks.generalist_quality")

CELLS = RESULTS / "quality_lite"

_LITE = ["generalist.backend=sam", "generalist.sam.variant=lite_medsam", "generalist.sam.precision=bf16",
         "generalist.sam.embed_batch_size=1", "prompts.use_points=false"]
SETS: dict[str, dict] = {
    "acdc3": {"config": "conf/acdc.yaml", "k": 6, "overrides": [f"data.root={SHARED / 'acdc'}"]},
    "acdc7": {"config": "conf/acdc.yaml", "k": 14, "overrides": [f"data.root={SHARED / 'acdc'}"]},
    "hippo1": {"config": "conf/hippocampus.yaml", "k": 1, "overrides": [
        f"data.root={SHARED / 'hippocampus'}", f"data.split_file={SHARED / 'hippocampus' / 'splits.json'}", *_LITE]},
    "hippo4": {"config": "conf/hippocampus.yaml", "k": 4, "overrides": [
        f"data.root={SHARED / 'hippocampus'}", f"data.split_file={SHARED / 'hippocampus' / 'splits.json'}", *_LITE]},
}
"""Set -> its config, labeled cases (k, frames for ACDC) and the overrides that make it use LiteMedSAM."""

BUDGET: dict[str, list[str]] = {
    "acdc": ["rounds=2", "train.iterations=400", "train.consistency.rampup_iterations=400",
             "train.pseudo_label.rampup_iterations=100", "eval.every_round=false", "data.max_unlabeled=40",
             "data.max_selection=10"],
    "hippo": ["rounds=3", "train.iterations=200", "train.consistency.rampup_iterations=300",
              "train.pseudo_label.rampup_iterations=100", "eval.every_round=false", "data.max_unlabeled=40"],
}
"""The same for every row of a set: rounds x iterations, the unlabeled cases relabeled (the first 40, so
that encoding them once fits the 2-core machine), the held-out selection cases."""

_OFFICIAL = q.ROWS["mean_teacher+semisam_official"][len(q._PL):]
ROWS: dict[str, list[str]] = {
    **{row: q.ROWS[row] for row in ("supervised", "mean_teacher", "uamt")},  # the same rows as the hippocampus matrix
    "semisam_official": [*_PL, *_OFFICIAL, "generalist.class_source=generalist"],
    "semisam_strong": [*_PL, *_STRONG, "generalist.class_source=generalist"],
    "best": [*_PL, *_STRONG, "generalist.class_source=auto", "generalist.overlap=nested"],
    # best, but the term learns only the voxels the generalist's classes decide: the classes auto gives the
    # specialist add no hard self-training on its own prediction (which cost test Dice in `best`)
    "best_gated": [*_PL, *_STRONG, "generalist.class_source=auto", "generalist.overlap=nested",
                   "train.pseudo_label.generalist_voxels_only=true"],
}
WARM_ROWS = {"semisam_official", "semisam_strong", "best", "best_gated"}
"""Rows whose round 0 (Mean Teacher without pseudo-labels) is the Mean Teacher cell's, taken with
``train.init_from``: the same data, model, seed and training settings, so paying it once is exact."""
COMPARISONS = [("mean_teacher", "supervised"), ("uamt", "supervised"), ("semisam_strong", "supervised"),
               ("best", "supervised"), ("semisam_official", "mean_teacher"),
               ("semisam_strong", "mean_teacher"), ("best", "mean_teacher"), ("best", "semisam_strong"),
               ("best_gated", "mean_teacher"), ("best_gated", "best")]


def cell_name(set_name: str, row: str, seed: int) -> str:
    return f"{set_name}-{row}-s{seed}"


def cell_overrides(set_name: str, row: str, seed: int, workdir: Path, extra: list[str]) -> list[str]:
    s = SETS[set_name]
    budget = BUDGET["acdc" if set_name.startswith("acdc") else "hippo"]
    warm = [f"train.init_from={workdir / cell_name(set_name, 'mean_teacher', seed)}"] if row in WARM_ROWS else []
    return [*s["overrides"], *budget, *ROWS[row], f"data.num_labeled={s['k']}", f"seed={seed}",
            f"name={cell_name(set_name, row, seed)}", f"output_dir={workdir}",
            f"generalist.cache_dir={workdir / 'embedding_cache'}", *warm, *extra]


CLASS_NAMES = {"acdc": {1: "RV", 2: "MYO", 3: "LV"}, "hippo": {1: "ant.", 2: "post."}}


def _ms(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


PLANNED_SEEDS = (0, 1, 2, 3, 4)
"""The seeds the issue's matrix asks for, every row of every set: the report says which cells are missing."""


def coverage_markdown(cells: list[dict]) -> str:
    """Which cells of the planned matrix (every set x row x :data:`PLANNED_SEEDS`) are finished: one line
    per set, "n/5" per row, with the missing seeds named, so a partial matrix says so itself."""
    done = {(c["k"], c["row"], c["seed"]) for c in cells}
    lines = ["| set | " + " | ".join(ROWS) + " |", "|---|" + "---|" * len(ROWS)]
    for set_name in SETS:
        out = []
        for row in ROWS:
            missing = [s for s in PLANNED_SEEDS if (set_name, row, s) not in done]
            have = len(PLANNED_SEEDS) - len(missing)
            out.append(f"{have}/{len(PLANNED_SEEDS)}" + (f" (no {','.join(map(str, missing))})" if 0 < have < len(PLANNED_SEEDS) else ""))
        lines.append(f"| {set_name} | " + " | ".join(out) + " |")
    return "Cells finished of the planned matrix (seeds 0-4; \"no 3,4\": seeds 3 and 4 not run):\n\n" + "\n".join(lines) + "\n"


def lite_markdown(table: list[dict], cells: list[dict]) -> str:
    """Test metrics per (set, row), then the per-class pseudo-label audit and the class sources chosen."""
    lines = ["| set | row | seeds | Dice mean | Dice per class | HD95 |", "|---|---|---|---|---|---|"]
    for e in table:
        names = CLASS_NAMES["acdc" if str(e["k"]).startswith("acdc") else "hippo"]
        u = "mm" if "hd95_mm" in e else "vox"
        per = ", ".join(f"{n} {_ms(e[f'dice_class{c}'])}" for c, n in names.items() if f"dice_class{c}" in e)
        lines.append(f"| {e['k']} | {e['row']} | {len(e['seeds'])} | **{_ms(e['dice'])}** | {per} | "
                     f"{_ms(e[f'hd95_{u}'], 2)} {u} |")
    lines += ["", "Pseudo-label audit (unlabeled cases against their hidden labels; per class: pseudo-label vs "
              "specialist Dice, mean over seeds) and the class sources used:", "",
              "| set | row | round | pseudo-label Dice | specialist Dice | per class: pseudo vs specialist | sources |",
              "|---|---|---|---|---|---|---|"]
    for e in table:
        names = CLASS_NAMES["acdc" if str(e["k"]).startswith("acdc") else "hippo"]
        for a in e["audit"]:
            per = ", ".join(f"{n} {a[f'pseudo_dice_class{c}']['mean']:.3f} vs {a[f'specialist_dice_class{c}']['mean']:.3f}"
                            for c, n in names.items() if f"pseudo_dice_class{c}" in a)
            chosen: dict[str, list[str]] = {}
            for c in cells:
                if c["row"] == e["row"] and c["k"] == e["k"]:
                    for rd in c["rounds"]:
                        if rd["round"] == a["round"]:
                            for cls, src in (rd.get("relabel") or {}).get("class_source", {}).items():
                                chosen.setdefault(names.get(int(cls), cls), []).append(src[0].upper())
            src = ", ".join(f"{n} {''.join(v)}" for n, v in chosen.items()) or "all G"
            lines.append(f"| {e['k']} | {e['row']} | {a['round']} | {_ms(a['pseudo_dice'])} | "
                         f"{_ms(a['specialist_dice'])} | {per} | {src} |")
    lines.append("\nSources: G = generalist, S = specialist, one letter per seed.")
    return "\n".join(lines) + "\n"


def plot_lite(cells: list[dict], path: Path) -> Path:
    """One panel per set: final test Dice per row, one dot per seed, a seed's cells joined by a line
    (the comparisons are paired), the mean as a bar; above each SemiSAM row its round-1 pseudo-label Dice
    minus the specialist's on the unlabeled cases (the audit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in SETS if any(c["k"] == s for c in cells)]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2), squeeze=False)
    for ax, set_name in zip(axes[0], sets, strict=True):
        mine = [c for c in cells if c["k"] == set_name]
        rows = [r for r in ROWS if any(c["row"] == r for c in mine)]
        for seed in sorted({c["seed"] for c in mine}):
            pts = [(i, c["final"]["dice"]) for i, r in enumerate(rows) for c in mine if c["row"] == r and c["seed"] == seed]
            ax.plot(*zip(*pts, strict=True), color=f"C{seed}", lw=0.7, alpha=0.45, marker="o", ms=4, zorder=2,
                    label=f"seed {seed}")
        for i, r in enumerate(rows):
            vals = [c["final"]["dice"] for c in mine if c["row"] == r]
            ax.hlines(sum(vals) / len(vals), i - 0.3, i + 0.3, color="k", lw=2, zorder=3)
            gains = [a["pseudo_dice"] - a["specialist_dice"] for c in mine if c["row"] == r
                     for a in c["audit"] if a["round"] == 1]
            if gains:
                ax.annotate(f"{sum(gains) / len(gains):+.3f}", (i, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), rows, rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_title(f"{set_name} ({len({c['seed'] for c in mine})} seeds)", pad=14)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("final test Dice (bar: mean; a line joins one seed)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("LiteMedSAM as the generalist; numbers above: round-1 pseudo-label minus specialist Dice",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(cells_dir: Path, out: Path) -> str:
    cells = load_cells(cells_dir)
    for c in cells:  # aggregate/paired key on (row, k): make k the set
        c["k"] = c.get("set", c["k"])
    sets = list(SETS)
    table = sorted(aggregate(cells, list(ROWS)), key=lambda e: (sets.index(e["k"]), list(ROWS).index(e["row"])))
    by = {(c["row"], c["k"], c["seed"]): c["final"]["dice"] for c in cells}
    pairs = sorted(paired_differences(by, COMPARISONS), key=lambda e: sets.index(e["k"]))  # stable: row order kept
    audit = {(c["row"], c["k"], c["seed"]): a for c in cells for a in c["audit"] if a["round"] == 1}
    plot_lite(cells, FIGURES / f"{out.stem}.png")
    atomic_write_text(out, json.dumps({"table": table, "paired_dice": pairs,
                                       "round1_audit": {"|".join(map(str, k)): v for k, v in audit.items()}},
                                      indent=1, default=float))
    return coverage_markdown(cells) + "\n" + lite_markdown(table, cells) + "\n\n" + paired_markdown(pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generalist_quality", description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=["acdc3"])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(PLANNED_SEEDS))
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "quality_lite")
    p.add_argument("--results", type=Path, default=CELLS)
    p.add_argument("--report", action="store_true", help="only aggregate the finished cells")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every cell")
    args = p.parse_args(argv)
    setup_logging(True, log)  # INFO for the library too: the class-source choice and audit lines
    if not args.report:
        args.results.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.generalist_quality " + shlex.join(sys.argv[1:] if argv is None else argv)
        for seed in args.seeds:
            for set_name in args.sets:
                # Mean Teacher first: the SemiSAM rows start from its round 0
                for row in sorted(args.rows, key=lambda r: (r in WARM_ROWS, list(ROWS).index(r))):
                    out = args.results / f"{cell_name(set_name, row, seed)}.json"
                    if out.exists():
                        log.info("%s: done already", out.name)
                        continue
                    overrides = cell_overrides(set_name, row, seed, args.workdir, args.set)
                    cfg = load_config(ROOT / SETS[set_name]["config"], overrides)
                    log.info("cell %s starts", cfg.name)
                    result = run_cell(cfg, SETS[set_name]["k"], row, seed, command, overrides)
                    result["set"] = set_name
                    atomic_write_text(out, json.dumps(result, indent=1, default=float))
                    log.info("cell %s: test Dice %.4f", cfg.name, result["final"]["dice"])
    print(report(args.results, args.results.parent / f"{args.results.name}.json"))  # quality_lite.json by default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
