"""Overlapped rounds against sequential ones (``workers.overlap``, issue 19): wall time and quality.

    .venv/bin/python -m benchmarks.overlap --part speed
    .venv/bin/python -m benchmarks.overlap --part quality --seeds 0 1 2
    .venv/bin/python -m benchmarks.overlap --report

``speed``: the same hippocampus run (``conf/hippocampus.yaml``, k = 1, the weight-free generalist, 4
rounds of 200 iterations, 60 unlabeled cases) twice, sequential and overlapped, with the trainer on one
CPU (one torch thread) and one SAM actor on the other, no audit (it would run in the driver, on the cores
the halves share). Per round: the wall time, the training and
relabeling times (``RoundSummary.timing``). The overlap's goal (the issue's): an overlapped round with both
halves takes <= 1.15 x max(train, relabel) of the same round run sequentially, instead of their sum.

``quality``: ACDC with 3 labeled patients and LiteMedSAM (the ``best`` row of
:mod:`benchmarks.generalist_quality`), 3 rounds of 400 iterations, sequential against overlapped, paired
seed by seed; round 0 is the Mean Teacher cell's (``train.init_from``), the embeddings come from the
matrix's cache. In the overlapped run round 1 trains without pseudo-labels and round 2 on masks one round
stale: the cost of the staleness is the paired difference of the final test Dice.

Results: ``benchmarks/results/overlap/*.json`` (one per run) and ``benchmarks/results/overlap.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time

import numpy as np

from benchmarks.common import RESULTS, ROOT, SHARED, machine_info, setup_logging
from benchmarks.generalist_quality import BUDGET as LITE_BUDGET
from benchmarks.generalist_quality import ROWS as LITE_ROWS
from benchmarks.generalist_quality import SETS
from benchmarks.generalist_quality import cell_name as lite_cell_name
from benchmarks.quality import BUDGET as HIPPO_BUDGET
from benchmarks.quality import ROWS as HIPPO_ROWS
from benchmarks.quality import final_metrics
from pipeline.atomic import atomic_write_text
from pipeline.config import load_config
from pipeline.run_folder import RunFolder
from pipeline.storage import read_table

log = logging.getLogger("benchmarks.overlap")

CELLS = RESULTS / "overlap"
WORKDIR = ROOT / "runs" / "overlap"
ONE_CPU_EACH = ["workers.local_num_cpus=2", "workers.trainer.num_cpus=1", "workers.trainer.torch_threads=1",
                "workers.sam.num_workers=1", "workers.sam.num_cpus=1", "workers.sam.torch_threads=1"]
SPEED = ["rounds=4", "data.max_unlabeled=60", "eval.every_round=false", "eval.audit_pseudo_labels=false",
         *ONE_CPU_EACH,
         f"data.root={SHARED / 'hippocampus'}", f"data.split_file={SHARED / 'hippocampus' / 'splits.json'}"]


def _run(config: str, overrides: list[str]) -> dict:
    """One run in ``WORKDIR`` (a fresh folder); its summaries, timings and final test metrics."""
    from semisam.launch import run

    cfg = load_config(ROOT / config, overrides)
    folder = RunFolder(cfg.run_dir)
    if folder.root.exists():
        folder.root.remove_tree()
    start = time.perf_counter()
    summaries = run(cfg)
    return {"name": cfg.name, "overrides": overrides, "seconds": round(time.perf_counter() - start, 1),
            "rounds": [{"round": s.round, "seconds": round(s.seconds, 2), "timing": s.timing,
                        "pseudo_round": s.train.get("pseudo_round"), "relabeled_cases": s.relabel.get("cases", 0)}
                       for s in summaries],
            "final": final_metrics(read_table(folder.table("eval", cfg.rounds - 1)))}


def speed(seed: int) -> list[dict]:
    """The speed pair (sequential, overlapped) of one seed."""
    out = []
    for overlap in (False, True):
        name = f"speed-{'overlap' if overlap else 'sequential'}-s{seed}"
        overrides = [*HIPPO_BUDGET, *HIPPO_ROWS["mean_teacher+semisam"], *SPEED, f"seed={seed}", f"name={name}",
                     f"output_dir={WORKDIR}", f"workers.overlap={str(overlap).lower()}"]
        out.append({"part": "speed", "overlap": overlap, "seed": seed, **_run("conf/hippocampus.yaml", overrides)})
    return out


def quality(seed: int) -> list[dict]:
    """The quality pair (sequential, overlapped) of one seed on acdc3 with LiteMedSAM."""
    out = []
    lite = ROOT / "runs" / "quality_lite"
    for overlap in (False, True):
        name = f"quality-{'overlap' if overlap else 'sequential'}-s{seed}"
        overrides = [*SETS["acdc3"]["overrides"], *LITE_BUDGET["acdc"], *LITE_ROWS["best"], "rounds=3",
                     f"data.num_labeled={SETS['acdc3']['k']}", f"seed={seed}", f"name={name}",
                     f"output_dir={WORKDIR}", f"generalist.cache_dir={lite / 'embedding_cache'}",
                     f"train.init_from={lite / lite_cell_name('acdc3', 'mean_teacher', seed)}",
                     f"workers.overlap={str(overlap).lower()}"]
        out.append({"part": "quality", "overlap": overlap, "seed": seed, **_run(SETS["acdc3"]["config"], overrides)})
    return out


def summarize(cells: list[dict]) -> dict:
    """Speed: per round with both halves, overlapped wall / max(sequential train, relabel) and sequential
    wall / max; quality: the paired difference of the final test Dice (overlapped - sequential)."""
    out: dict = {"speed": [], "quality": []}
    by = {(c["part"], c["seed"], c["overlap"]): c for c in cells}
    for (part, seed, overlap), c in sorted(by.items()):
        seq = by.get((part, seed, False))
        if not overlap or seq is None:
            continue
        if part == "speed":
            for r_seq, r_ov in zip(seq["rounds"], c["rounds"], strict=True):
                t = r_seq["timing"]
                if "relabel_s" not in t or "relabel_s" not in r_ov["timing"]:
                    continue  # a round without both halves
                longest = max(t["relabel_s"], t["train_s"])
                out["speed"].append({"seed": seed, "round": r_seq["round"], "sequential_s": r_seq["seconds"],
                                     "overlapped_s": r_ov["seconds"], "train_s": t["train_s"],
                                     "relabel_s": t["relabel_s"],
                                     "overlapped_over_max": round(r_ov["seconds"] / longest, 3),
                                     "sequential_over_max": round(r_seq["seconds"] / longest, 3)})
        else:
            out["quality"].append({"seed": seed, "sequential_dice": seq["final"]["dice"],
                                   "overlapped_dice": c["final"]["dice"],
                                   "difference": c["final"]["dice"] - seq["final"]["dice"]})
    diffs = [q["difference"] for q in out["quality"]]
    if diffs:
        out["quality_mean_difference"] = float(np.mean(diffs))
        out["quality_std_difference"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overlap", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["speed", "quality"], nargs="*", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--report", action="store_true", help="only summarize the runs already there")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, log)
    command = "python -m benchmarks.overlap " + " ".join(sys.argv[1:] if argv is None else argv)
    CELLS.mkdir(parents=True, exist_ok=True)
    for part in args.part:
        for seed in args.seeds:
            for cell in (speed if part == "speed" else quality)(seed):
                cell.update({"command": command, "machine": machine_info(),
                             "date": dt.datetime.now(dt.timezone.utc).isoformat()})
                atomic_write_text(CELLS / f"{cell['name']}.json", json.dumps(cell, indent=1))
                log.info("%s: %.0f s, test Dice %.4f", cell["name"], cell["seconds"], cell["final"]["dice"])
    cells = [json.loads(f.read_text()) for f in sorted(CELLS.glob("*.json"))]
    summary = summarize(cells)
    atomic_write_text(RESULTS / "overlap.json", json.dumps({**summary, "command": command, "machine": machine_info(),
                                                             "date": dt.datetime.now(dt.timezone.utc).isoformat()},
                                                            indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
