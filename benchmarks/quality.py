"""Quality benchmark: does SAM's supervision help? The method matrix on the fixed hippocampus split.

    .venv/bin/python -m benchmarks.quality                       # the whole matrix (resumable)
    .venv/bin/python -m benchmarks.quality --k 1 --rows supervised mean_teacher   # part of it
    .venv/bin/python -m benchmarks.quality --report              # only aggregate, plot and print the table

Cells are (k, row, seed): k labeled cases (the first k of the split's ``train_order``), the other 200-k
unlabeled, 60 test cases. Every row of a k runs the same specialist (``conf/hippocampus.yaml``: 2D U-Net)
with the same schedule and iteration budget (``BUDGET``); the rows differ only in the method overrides
(``ROWS``). The fully supervised rows (all 200 labeled) are the ceiling, run once per seed: with the
same budget, and with 5x the iterations (200 cases need more than 600 iterations to be seen).

Each cell is a normal run (``pipeline.coordinator.Coordinator``, actors on one local Ray cluster shared
by all cells) in ``runs/quality/<cell>``. When it finishes, its numbers go to
``benchmarks/results/quality/<cell>.json`` (committed); a cell with that file is skipped, and a run folder
left by an interrupted cell resumes after its last completed round. After the cells, the aggregate
(mean ± std over seeds) goes to ``benchmarks/results/quality.json`` and the plots to ``docs/figures/``.

Test metrics are those of the last round's checkpoint on the 60 test cases: Dice and Jaccard per class
(1 anterior, 2 posterior) and their mean, HD95 and ASD in mm. For SemiSAM rows every relabel round is
audited: Dice of the stored pseudo-labels and of the specialist's own predictions against the hidden
labels of the unlabeled cases (read by the driver after the round, never by training or prompting).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import DOCS, FIGURES, RESULTS, ROOT, machine_info, preset_overrides, setup_logging
from pipeline.atomic import atomic_write_text
from pipeline.config import RunConfig, load_config
from pipeline.evaluation import CERTAIN_COLUMNS, METRIC_COLUMNS, round_means
from pipeline.evaluation import audit_means as table_audit_means
from pipeline.run_folder import RunFolder
from pipeline.storage import read_table

log = logging.getLogger("benchmarks.quality")

CONFIG = ROOT / "conf" / "hippocampus.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"
TABLE_START, TABLE_END = "<!-- quality-table: written by python -m benchmarks.quality -->", "<!-- /quality-table -->"
FULL_K = 200

# One schedule for every row: 3 rounds of 200 iterations (round 0 without pseudo-labels; SemiSAM rows
# relabel before rounds 1 and 2 with the previous round's checkpoint). Only the last round is evaluated
# on the test split (it costs more than a round of training on this machine).
BUDGET = ["rounds=3", "train.iterations=200", "train.consistency.rampup_iterations=300",
          "train.pseudo_label.rampup_iterations=100", "train.log_every=200", "eval.every_round=false"]
_NO_PL = "train.pseudo_label.enabled=false"
_PL = ["train.method=mean_teacher", "train.pseudo_label.enabled=true", "eval.audit_pseudo_labels=true"]
_STRONG = preset_overrides(CONFIG.parent / "hippocampus_strong_term.yaml")  # the preset, as overrides
ROWS: dict[str, list[str]] = {
    "supervised": ["train.method=supervised", _NO_PL],
    "mean_teacher": ["train.method=mean_teacher", _NO_PL],
    "uamt": ["train.method=uamt", _NO_PL],
    # the SemiSAM term as published, the default (conf/hippocampus.yaml): MSE on softmax, 0.05, ramped down
    "mean_teacher+semisam_official": [*_PL, "train.pseudo_label.loss=mse", "train.pseudo_label.schedule=down",
                                      "train.pseudo_label.weight=0.05"],
    # ours, the strong form (conf/hippocampus_strong_term.yaml): CE + Dice on the hard mask, 0.5 ramped up, held
    "mean_teacher+semisam": [*_PL, *_STRONG],
    # ours with a 3-member prompt ensemble: the consensus mask, its voxels weighted by certainty
    "mean_teacher+semisam+ensemble": [*_PL, *_STRONG, "prompts.ensemble=3",
                                      "train.pseudo_label.uncertainty_weighting=true"],
    # the Mean Teacher sweep (issue 9 item 1): consistency weight x ramp length, k=4
    "mean_teacher_w1": ["train.method=mean_teacher", _NO_PL, "train.consistency.weight=1.0"],
    "mean_teacher_w10": ["train.method=mean_teacher", _NO_PL, "train.consistency.weight=10.0"],
    "mean_teacher_w1_ramp50": ["train.method=mean_teacher", _NO_PL, "train.consistency.weight=1.0",
                               "train.consistency.rampup_iterations=50"],
    "mean_teacher_w10_ramp50": ["train.method=mean_teacher", _NO_PL, "train.consistency.weight=10.0",
                                "train.consistency.rampup_iterations=50"],
    "full_supervised": ["train.method=supervised", _NO_PL],
    # the same 600 iterations spread over 200 cases leave the ceiling undertrained: also 5x the budget
    "full_supervised_long": ["train.method=supervised", _NO_PL, "train.iterations=1000"],
}
MATRIX_ROWS = ["supervised", "mean_teacher", "uamt", "mean_teacher+semisam_official", "mean_teacher+semisam",
               "mean_teacher+semisam+ensemble"]
"""The rows run by default; the sweep and the fully supervised ceiling run when named in ``--rows``."""
SWEEP_ROWS = ["mean_teacher_w1", "mean_teacher_w10", "mean_teacher_w1_ramp50", "mean_teacher_w10_ramp50"]
FULL_ROWS = ("full_supervised", "full_supervised_long")
KS = [1, 2, 4]
SEEDS = [0, 1, 2, 3, 4]
COMPARISONS = [
    ("mean_teacher", "supervised"), ("uamt", "supervised"),
    ("mean_teacher+semisam_official", "mean_teacher"), ("mean_teacher+semisam", "mean_teacher"),
    ("mean_teacher+semisam", "mean_teacher+semisam_official"),
    ("mean_teacher+semisam+ensemble", "mean_teacher+semisam"), ("mean_teacher+semisam+ensemble", "mean_teacher"),
    *[(row, "mean_teacher") for row in SWEEP_ROWS], *[(row, "supervised") for row in SWEEP_ROWS],
]
"""(row, baseline) pairs compared seed by seed (same k, same seed: the same labeled cases, initial
weights and sampling until the methods diverge)."""
AUDIT_COMPARISONS = [("mean_teacher+semisam+ensemble", "mean_teacher+semisam")]
"""(row, baseline) pairs whose pseudo-labels are compared seed by seed (:func:`paired_audit`)."""


def cell_name(k: int, row: str, seed: int) -> str:
    return f"k{k:03d}-{row.replace('+', '-')}-s{seed}"


def cell_overrides(k: int, row: str, seed: int, data: Path, workdir: Path, extra: list[str]) -> list[str]:
    """Every override of ``conf/hippocampus.yaml`` that makes the cell (k, row, seed)."""
    overrides = [*BUDGET, *ROWS[row], f"data.num_labeled={k}", f"seed={seed}", f"name={cell_name(k, row, seed)}",
                 f"output_dir={workdir}", f"data.root={data}", f"data.split_file={data / 'splits.json'}",
                 # one embedding cache for every cell (used with a SAM generalist: --set generalist.backend=sam ...)
                 f"generalist.cache_dir={workdir / 'embedding_cache'}", *extra]
    if row in FULL_ROWS:
        overrides.append("eval.audit_pseudo_labels=false")
    return overrides


def cell_config(k: int, row: str, seed: int, data: Path, workdir: Path, extra: list[str]) -> RunConfig:
    return load_config(CONFIG, cell_overrides(k, row, seed, data, workdir, extra))


def final_metrics(eval_df: pd.DataFrame) -> dict[str, float]:
    """Per-class and mean Dice/Jaccard/HD95/ASD of one round's eval table (rows: case x class)."""
    return round_means(eval_df, per_class=METRIC_COLUMNS)


def audit_means(run_dir: Path) -> list[dict]:
    """Mean audit Dice per relabel round (and per class) of a run: pseudo-labels vs specialist."""
    rows = []
    for loc in RunFolder(run_dir).tables("audit"):
        a = read_table(loc)
        means = table_audit_means(a)
        row = {"round": int(a["round"].iloc[0]), "pseudo_dice": means["pseudo_dice"],
               "specialist_dice": means["specialist_dice"]}
        for cid, per in means["by_class"].items():
            row[f"pseudo_dice_class{cid}"] = per["pseudo_dice"]
            row[f"specialist_dice_class{cid}"] = per["specialist_dice"]
        row.update({k: means[k] for k in CERTAIN_COLUMNS if k in means})  # ensemble rows only
        rows.append(row)
    return rows


def run_cell(cfg: RunConfig, k: int, row: str, seed: int, command: str, overrides: list[str]) -> dict:
    from semisam.launch import run

    start = time.perf_counter()
    summaries = run(cfg)
    last = cfg.rounds - 1
    eval_df = read_table(RunFolder(cfg.run_dir).table("eval", last))
    return {
        "cell": cfg.name, "k": k, "row": row, "seed": seed,
        "final": final_metrics(eval_df),
        "test_cases": int(eval_df["case_id"].nunique()),
        "rounds": [{"round": s.round, "seconds": round(s.seconds, 1), "test_dice": s.test.get("dice"),
                    "train": s.train, "relabel": s.relabel} for s in summaries],
        "audit": audit_means(cfg.run_dir),
        "overrides": overrides,
        "config": cfg.model_dump(mode="json"),
        "seconds_this_call": round(time.perf_counter() - start, 1),
        "command": command, "machine": machine_info(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


# -- aggregate ---------------------------------------------------------------------------------------
def load_cells(cells_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))]


def aggregate(cells: list[dict], rows: list[str] | None = None) -> list[dict]:
    """One entry per (row, k): mean and std over seeds of every final metric, and of the audit per round.
    Entries are ordered by ``rows`` (default: this module's :data:`ROWS`), then k."""
    order = list(ROWS) if rows is None else list(rows)
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["row"], c["k"]), []).append(c)
    out = []
    for (row, k), cs in sorted(groups.items(), key=lambda x: (order.index(x[0][0]), x[0][1])):
        entry: dict = {"row": row, "k": k, "seeds": sorted(c["seed"] for c in cs)}
        for key in cs[0]["final"]:
            vals = np.array([c["final"][key] for c in cs], float)
            entry[key] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))}
        audit_rounds = sorted({a["round"] for c in cs for a in c["audit"]})
        entry["audit"] = []
        for r in audit_rounds:
            per = [a for c in cs for a in c["audit"] if a["round"] == r]
            entry["audit"].append({"round": r, **{
                key: {"mean": float(np.nanmean([a[key] for a in per])), "std": float(np.nanstd([a[key] for a in per]))}
                for key in per[0] if key != "round"}})
        out.append(entry)
    return out


def paired_differences(by: dict[tuple[str, int, int], float], comparisons, lower_is_better: bool = False,
                       ) -> list[dict]:
    """Seed-by-seed differences of one value, ``by[(row, k, seed)]``, for every (row, baseline) of
    ``comparisons`` and every k where both have at least two common seeds: the differences, their mean and
    sample std, the 95% confidence interval of the mean (Student t, n-1 degrees of freedom), the paired
    t-test's two-sided p, and a verdict: ``gain``/``loss`` only when the interval excludes 0, ``identical``
    when every difference is 0, else ``within noise`` (with ``lower_is_better`` a gain is a decrease)."""
    from scipy import stats

    out = []
    for row, base in comparisons:
        for k in sorted({kk for (_, kk, _) in by}):
            seeds = sorted(s for (r, kk, s) in by if r == row and kk == k and (base, k, s) in by)
            if len(seeds) < 2:
                continue
            a, b = [by[(row, k, s)] for s in seeds], [by[(base, k, s)] for s in seeds]
            d = np.subtract(a, b, dtype=float)
            mean, sd, n = float(d.mean()), float(d.std(ddof=1)), len(d)
            half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if sd > 0 else 0.0
            p = float(stats.ttest_rel(a, b).pvalue) if sd > 0 else float("nan")
            better = -1.0 if lower_is_better else 1.0
            lo, hi = sorted((better * (mean - half), better * (mean + half)))
            verdict = ("identical" if not d.any() else "gain" if lo > 0 else "loss" if hi < 0 else "within noise")
            out.append({"row": row, "baseline": base, "k": k, "seeds": seeds,
                        "differences": [round(float(x), 4) for x in d], "mean": mean, "std": sd,
                        "ci95": [mean - half, mean + half], "p_paired_t": p, "verdict": verdict})
    return out


def paired(cells: list[dict], metric: str = "dice") -> list[dict]:
    """:func:`paired_differences` of the final test ``metric`` for :data:`COMPARISONS` (for HD95/ASD a gain
    is a decrease). Cells without the metric (another distance unit) are skipped."""
    by = {(c["row"], c["k"], c["seed"]): c["final"][metric] for c in cells if metric in c["final"]}
    return [{**d, "metric": metric}
            for d in paired_differences(by, COMPARISONS, lower_is_better=metric.startswith(("hd95", "asd")))]


def paired_audit(cells: list[dict], relabel_round: int = 1) -> list[dict]:
    """:func:`paired_differences` of the pseudo-label audit Dice of ``relabel_round`` for
    :data:`AUDIT_COMPARISONS`. Round 1 is the clean comparison of pseudo-labels: round 0 trains without
    them, so both rows relabel with the same checkpoint and differ only in how they make the masks."""
    by = {(c["row"], c["k"], c["seed"]): a["pseudo_dice"] for c in cells for a in c["audit"]
          if a["round"] == relabel_round}
    return [{**d, "metric": "pseudo_dice", "round": relabel_round}
            for d in paired_differences(by, AUDIT_COMPARISONS)]


def _ms(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def markdown(table: list[dict]) -> str:
    """The results table and the audit table, as Markdown."""
    lines = ["| k | row | seeds | Dice mean | Dice ant. | Dice post. | Jaccard mean | Jacc. ant. | Jacc. post. "
             "| HD95 | ASD |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        u = "mm" if "hd95_mm" in e else "vox"  # data without voxel spacing: voxels, never called mm
        lines.append(f"| {e['k']} | {e['row']} | {len(e['seeds'])} | **{_ms(e['dice'])}** | {_ms(e['dice_class1'])} | "
                     f"{_ms(e['dice_class2'])} | {_ms(e['jaccard'])} | {_ms(e['jaccard_class1'])} | "
                     f"{_ms(e['jaccard_class2'])} | {_ms(e[f'hd95_{u}'], 2)} {u} | {_ms(e[f'asd_{u}'], 2)} {u} |")
    lines += ["", "Pseudo-label audit (unlabeled cases, against their hidden labels; mean over cases and classes):",
              "", "| k | row | round | pseudo-label Dice | on certain voxels: pseudo vs specialist (certain share) | "
              "specialist Dice | "
              "difference |", "|---|---|---|---|---|---|---|"]
    for e in table:
        for a in e["audit"]:
            diff = a["pseudo_dice"]["mean"] - a["specialist_dice"]["mean"]
            certain = (f"{_ms(a['pseudo_dice_certain'])} vs {_ms(a['specialist_dice_certain'])} "
                       f"({a['certain_fraction']['mean']:.3f})" if "specialist_dice_certain" in a else "-")
            lines.append(f"| {e['k']} | {e['row']} | {a['round']} | {_ms(a['pseudo_dice'])} | {certain} | "
                         f"{_ms(a['specialist_dice'])} | {diff:+.3f} |")
    return "\n".join(lines) + "\n"


def paired_markdown(pairs: list[dict], label: str = "Dice") -> str:
    """The seed-by-seed comparison table, as Markdown (``label`` names the metric in its header)."""
    lines = [f"| k | row | against | seeds | {label} difference per seed | mean ± std | 95% CI | paired t p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in pairs:
        per = " ".join(f"{x:+.3f}" for x in c["differences"])
        p = "-" if np.isnan(c["p_paired_t"]) else f"{c['p_paired_t']:.3f}"
        lines.append(f"| {c['k']} | {c['row']} | {c['baseline']} | {len(c['seeds'])} | {per} | "
                     f"{c['mean']:+.3f} ± {c['std']:.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {p} | "
                     f"**{c['verdict']}** |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], out_dir: Path) -> list[Path]:
    """dice_vs_k.png (test Dice against k per row) and pseudo_label_dice.png (audit per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in ROWS:
        es = [e for e in table if e["row"] == row]
        if not es or row in FULL_ROWS or row in SWEEP_ROWS:
            continue
        ks = [e["k"] for e in es]
        ax.errorbar(ks, [e["dice"]["mean"] for e in es], yerr=[e["dice"]["std"] for e in es], marker="o",
                    capsize=3, label=row)
    for e in table:
        if e["row"] in FULL_ROWS:
            iters = "600" if e["row"] == "full_supervised" else "3000"
            ax.axhline(e["dice"]["mean"], color="k", ls="--" if e["row"] == "full_supervised" else ":", lw=1,
                       label=f"full supervised ({FULL_K} labeled, {iters} it.)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("labeled cases k")
    ax.set_ylabel("test Dice (mean of 2 classes, 60 cases)")
    ax.set_title(f"MSD Hippocampus: test Dice against k (mean ± std, {max(len(e['seeds']) for e in table)} seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "quality_dice_vs_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for e in table:
        if not e["audit"]:
            continue
        rounds = [a["round"] for a in e["audit"]]
        line = ax.errorbar(rounds, [a["pseudo_dice"]["mean"] for a in e["audit"]],
                           yerr=[a["pseudo_dice"]["std"] for a in e["audit"]], marker="o", capsize=3,
                           label=f"k={e['k']} {e['row']}: pseudo-label")
        ax.plot(rounds, [a["specialist_dice"]["mean"] for a in e["audit"]], ls=":", marker="x",
                color=line[0].get_color(), label=f"k={e['k']} {e['row']}: specialist")
    ax.set_xticks(sorted({a["round"] for e in table for a in e["audit"]}))
    ax.set_xlabel("relabel round (pseudo-labels from the checkpoint of the round before)")
    ax.set_ylabel("Dice vs hidden labels (unlabeled cases)")
    ax.set_title(f"Pseudo-label audit per round (mean ± std, {max(len(e['seeds']) for e in table)} seeds)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "quality_pseudo_label_dice.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def provenance(cells: list[dict]) -> str:
    """One line: the dates, machine and summed run time of the cells."""
    if not cells:
        return ""
    dates = sorted(c["date"][:10] for c in cells)
    m = cells[-1]["machine"]
    total = sum(sum(r["seconds"] for r in c["rounds"]) for c in cells)
    return (f"{len(cells)} cells, run {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
            + f" on {m['cpu_count']} CPUs ({m['cpu_model'] or 'unknown CPU'}), {m['memory_gib']} GiB, torch "
            f"{m['torch']}, Ray {m['ray']}, GPU: {'yes' if m['gpu'] else 'none'}; the rounds of all cells took "
            f"{total / 60:.0f} min in total.\n")


def update_docs(docs: Path, text: str) -> bool:
    """Replace the text between the quality-table markers of ``docs``; False when the markers are absent."""
    if not docs.is_file():
        return False
    doc = docs.read_text()
    if TABLE_START not in doc or TABLE_END not in doc:
        return False
    head, rest = doc.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    atomic_write_text(docs, f"{head}{TABLE_START}\n{text}{TABLE_END}{tail}")
    return True


def report(cells_dir: Path, out: Path, figures: Path, docs: Path | None = DOCS) -> str:
    """Aggregate the finished cells into ``out``, draw the plots, refresh the table in ``docs``."""
    cells = load_cells(cells_dir)
    table = aggregate(cells)
    pairs, pairs_hd, pairs_audit = paired(cells), paired(cells, "hd95_mm"), paired_audit(cells)
    atomic_write_text(out, json.dumps({"budget": BUDGET, "rows": ROWS, "config": str(CONFIG.relative_to(ROOT)),
                                       "table": table, "paired": pairs, "paired_hd95_mm": pairs_hd,
                                       "paired_audit_round1": pairs_audit,
                                       "cells": [c["cell"] for c in cells]}, indent=1))
    if table:
        plot(table, figures)
    text = (markdown(table) + "\nSeed-by-seed differences of the test Dice (a gain is called a gain only when "
            "its 95% interval excludes 0):\n\n" + paired_markdown(pairs) + "\nThe same for HD95 (mm; lower is "
            "better, so a gain is a negative difference):\n\n" + paired_markdown(pairs_hd, "HD95")
            + "\nSeed-by-seed differences of the pseudo-labels' audit Dice in relabel round 1 (both rows relabel "
            "with the same round-0 checkpoint, so only the way the masks are made differs):\n\n"
            + paired_markdown(pairs_audit, "pseudo-label Dice") + "\n" + provenance(cells))
    if docs is not None:
        update_docs(docs, text)
    return text


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=KS)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=MATRIX_ROWS)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="only aggregate the finished cells")
    p.add_argument("--refresh-audit", action="store_true",
                   help="first re-read each finished cell's audit from its run folder's audit tables (after a "
                        "change to what the summary keeps; cells whose run folder is gone are left as they are)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every cell (changes the results: use another --results)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, log)
    cells_dir = args.results / "quality"
    cells_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.report:
        if not (args.data / "dataset.json").is_file():
            log.error("no dataset at %s (give --data)", args.data)
            return 2
        todo = []
        for k in args.k:  # k by k, then seed by seed: a k's whole matrix finishes before the next k starts
            for seed in args.seeds:
                for row in args.rows:
                    if row not in FULL_ROWS:
                        todo.append((k, row, seed))
        for seed in args.seeds:
            for row in FULL_ROWS:
                if row in args.rows:
                    todo.append((FULL_K, row, seed))
        todo = [t for t in todo if not (cells_dir / f"{cell_name(*t)}.json").exists()]
        # validate every config before any work starts
        overrides = [cell_overrides(k, row, seed, args.data, args.workdir, args.set) for k, row, seed in todo]
        configs = [load_config(CONFIG, o) for o in overrides]
        log.info("%d cells to run", len(todo))
        if todo:
            import ray

            from pipeline.ray_runtime import init_ray

            init_ray(configs[0].workers)
            try:
                for (k, row, seed), cfg, cell_set in zip(todo, configs, overrides, strict=True):
                    log.info("cell %s", cfg.name)
                    result = run_cell(cfg, k, row, seed, command, cell_set)
                    atomic_write_text(cells_dir / f"{cfg.name}.json", json.dumps(result, indent=1))
                    log.info("cell %s: test Dice %.3f in %.0f s", cfg.name, result["final"]["dice"],
                             result["seconds_this_call"])
            finally:
                ray.shutdown()
    if args.refresh_audit:
        for path in sorted(cells_dir.glob("*.json")):
            cell = json.loads(path.read_text())
            run_dir = args.workdir / cell["cell"]
            if RunFolder(run_dir).tables("audit"):
                cell["audit"] = audit_means(run_dir)
                atomic_write_text(path, json.dumps(cell, indent=1))
    docs = DOCS if args.results == RESULTS else None  # other experiments (--set) do not touch the docs
    print(report(cells_dir, args.results / "quality.json", FIGURES if docs else args.results / "figures", docs),
          end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
