"""Rerun a committed quality cell and compare its numbers bit for bit.

    .venv/bin/python -m benchmarks.rerun_cell benchmarks/results/reference/k001-mean_teacher-semisam-s0.json

The cell's own overrides (``conf/hippocampus.yaml`` + the overrides recorded in the cell's JSON) are run
again in a fresh run folder (``--workdir``, default ``runs/rerun``; the recorded ``output_dir`` and
``generalist.cache_dir`` are replaced by it, nothing else), on one local Ray cluster. Compared exactly
(``==`` on the floats as JSON holds them): the final test metrics, every round's training statistics,
relabel statistics and test Dice, and the pseudo-label audit. Wall times are not compared. Writes
``benchmarks/results/rerun_cell.json`` (what differed, if anything) and prints one line per cell.

Why: a refactoring that claims "no change in what the program computes" (issue 17) is held to it by a
rerun of a cell committed before it. A cell from before the per-round reseeding (2026-11-29) cannot
match: its rounds drew other crops.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
from pathlib import Path

from benchmarks.common import ROOT, machine_info, setup_logging
from benchmarks.quality import CONFIG, run_cell
from pipeline.atomic import atomic_write_text
from pipeline.config import load_config

log = logging.getLogger("benchmarks.rerun_cell")

OUT = ROOT / "benchmarks" / "results" / "rerun_cell.json"
COMPARED_ROUND_KEYS = ("round", "test_dice", "train", "relabel")


def rerun_overrides(cell: dict, workdir: Path) -> list[str]:
    """The cell's recorded overrides, with its run folder and embedding cache moved under ``workdir``."""
    moved = {"output_dir": str(workdir), "generalist.cache_dir": str(workdir / "embedding_cache")}
    out = []
    for text in cell["overrides"]:
        key = text.split("=", 1)[0]
        out.append(f"{key}={moved[key]}" if key in moved else text)
    return out


def differences(old, new, where: str = "") -> list[str]:
    """Every leaf where two JSON trees differ, as ``path: old != new`` (NaN equals NaN)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{where}.{k}: missing in the rerun" for k in old if k not in new]
        out += [f"{where}.{k}: only in the rerun" for k in new if k not in old]
        for k in old:
            if k in new:
                out += differences(old[k], new[k], f"{where}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{where}[{i}]")]
    if old == new or (isinstance(old, float) and isinstance(new, float) and old != old and new != new):
        return []
    return [f"{where}: {old!r} != {new!r}"]


def compared(cell: dict) -> dict:
    """The numbers of a cell that a rerun must reproduce (JSON-normalised)."""
    picked = {"final": cell["final"], "audit": cell["audit"],
              "rounds": [{k: r.get(k) for k in COMPARED_ROUND_KEYS} for r in cell["rounds"]]}
    return json.loads(json.dumps(picked))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerun_cell", description=__doc__.split("\n")[0])
    p.add_argument("cells", nargs="+", type=Path, help="committed cell JSON files (benchmarks/results/...)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "rerun")
    p.add_argument("--out", type=Path, default=OUT, help="where the comparison goes")
    p.add_argument("--save-cells", type=Path, default=None, help="also write each rerun's own cell JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, log)
    command = "python -m benchmarks.rerun_cell " + " ".join(sys.argv[1:] if argv is None else argv)
    import ray

    from pipeline.ray_runtime import init_ray

    results = []
    cells = [json.loads(path.read_text()) for path in args.cells]
    configs = [load_config(CONFIG, rerun_overrides(c, args.workdir.resolve())) for c in cells]  # all valid first
    init_ray(configs[0].workers)
    try:
        for path, cell, cfg in zip(args.cells, cells, configs, strict=True):
            shutil.rmtree(args.workdir / cfg.name, ignore_errors=True)  # a fresh run, never a resume
            new = run_cell(cfg, cell["k"], cell["row"], cell["seed"], command, rerun_overrides(cell, args.workdir))
            diffs = differences(compared(cell), compared(new))
            if args.save_cells is not None:
                args.save_cells.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.save_cells / f"{cfg.name}.json", json.dumps(new, indent=1))
            full = path.resolve()
            results.append({"cell": str(full.relative_to(ROOT) if full.is_relative_to(ROOT) else full),
                            "committed_date": cell["date"], "identical": not diffs, "differences": diffs[:50],
                            "final_dice": {"committed": cell["final"]["dice"], "rerun": new["final"]["dice"]},
                            "seconds": new["seconds_this_call"]})
            print(f"{cfg.name}: {'bit for bit identical' if not diffs else f'{len(diffs)} differences'} "
                  f"(test Dice {cell['final']['dice']!r} vs {new['final']['dice']!r})", flush=True)
    finally:
        ray.shutdown()
    atomic_write_text(args.out, json.dumps({"cells": results, "command": command, "machine": machine_info(),
                                       "date": dt.datetime.now(dt.timezone.utc).isoformat()}, indent=1))
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
