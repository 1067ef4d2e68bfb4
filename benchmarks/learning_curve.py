"""The learning curve that picks the training budget: Mean Teacher on ACDC with 3 labeled patients at
several total budgets, a few seeds each, test Dice and its spread.

    .venv/bin/python -m benchmarks.learning_curve [--budgets 1000 2000 4000 8000] [--seeds 0 1]
        [--optimizer adam|sgd] [--report]

A budget of N iterations is 2 rounds of N/2 (the SemiSAM rows relabel once, between them), Mean Teacher's
consistency ramp spans the run, and every other setting is ``benchmarks.generalist_quality``'s ACDC cell
(the trainer's path is ``auto``: what this machine does fastest). ``--optimizer sgd`` is the literature's
(SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly decay 0.9 over the run). Cells are normal runs,
resumable round by round (a stopped cell continues where it stopped); one JSON per cell in
``benchmarks/results/learning_curve/<optimizer>-<budget>/``; ``--report`` aggregates them into
``benchmarks/results/learning_curve.json`` with the seconds each cell cost on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from benchmarks import generalist_quality as gq
from benchmarks.common import RESULTS, ROOT, setup_logging
from pipeline.atomic import atomic_write_text

log = logging.getLogger("benchmarks.learning_curve")
OUT = RESULTS / "learning_curve"
OPTIMIZERS = {
    "adam": [],  # conf/acdc.yaml's: Adam, lr 0.003, constant
    "sgd": ["train.optimizer=sgd", "train.lr=0.01", "train.weight_decay=0.0001", "train.lr_schedule=poly",
            "train.lr_poly_power=0.9"],
}


def budget_overrides(budget: int, optimizer: str) -> list[str]:
    """2 rounds of budget/2 iterations, the consistency ramp over the run, the optimizer's settings."""
    per_round = budget // 2
    return ["rounds=2", f"train.iterations={per_round}", f"train.consistency.rampup_iterations={budget}",
            *OPTIMIZERS[optimizer]]


def folder(budget: int, optimizer: str) -> str:
    return f"{optimizer}-{budget}"


def run(budgets: list[int], seeds: list[int], optimizer: str, workdir: Path) -> None:
    for budget in budgets:
        name = folder(budget, optimizer)
        args = ["--sets", "acdc3", "--rows", "mean_teacher", "--seeds", *map(str, seeds),
                "--workdir", str(workdir / name), "--results", str(OUT / name),
                "--set", *budget_overrides(budget, optimizer)]
        log.info("budget %d (%s): python -m benchmarks.generalist_quality %s", budget, optimizer, " ".join(args))
        if gq.main(args):
            raise SystemExit(f"the cells of budget {budget} failed")


def report() -> dict:
    rows = []
    for d in sorted(OUT.glob("*-*")):
        cells = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
        if not cells:
            continue
        optimizer, budget = d.name.split("-")
        dice = [c["final"]["dice"] for c in cells]
        rows.append({"optimizer": optimizer, "budget": int(budget), "seeds": [c["seed"] for c in cells],
                     "dice": dice, "dice_mean": statistics.mean(dice),
                     "dice_std": statistics.pstdev(dice) if len(dice) > 1 else None,
                     "seconds_per_cell": statistics.mean(sum(r["seconds"] for r in c["rounds"]) for c in cells),
                     "machine": cells[0]["machine"]})
    result = {"rows": sorted(rows, key=lambda r: (r["optimizer"], r["budget"])),
              "command": "python -m benchmarks.learning_curve"}
    atomic_write_text(RESULTS / "learning_curve.json", json.dumps(result, indent=1))
    for r in result["rows"]:
        log.info("%s %5d it: Dice %.3f ± %s over %d seeds, %.0f s a cell", r["optimizer"], r["budget"],
                 r["dice_mean"], "-" if r["dice_std"] is None else f"{r['dice_std']:.3f}", len(r["seeds"]),
                 r["seconds_per_cell"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "learning_curve")
    p.add_argument("--report", action="store_true", help="only aggregate the finished cells")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, log)
    if not args.report:
        run(args.budgets, args.seeds, args.optimizer, args.workdir)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
