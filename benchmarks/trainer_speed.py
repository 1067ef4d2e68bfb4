"""The specialist's training speed on this machine: the old path (eager fp32, batches built in the loop)
against the path ``auto`` chooses, with the same seed, batches and iterations, and the test Dice of each.

    .venv/bin/python -m benchmarks.trainer_speed [--quick] [--iterations N] [--paths eager_fp32 chosen ...]

Setting: ACDC, 3 labeled patients (``conf/acdc.yaml``: 2D U-Net, 160 x 160 crops, batch 4 + 4), Mean
Teacher, no pseudo-labels. Each path is its own ``SpecialistTrainer`` with one seed; the paths train in
turns of ``--chunk`` iterations (A, B, A, B, ...), so a load from another process falls on every path
alike, and it/s is measured over every turn but the first (which pays compiling). Then each path's student
is evaluated on the first ``--test-cases`` volumes of test.list (the evaluation's sliding window).

Paths: ``eager_fp32`` (precision fp32, contiguous, eager, no prefetch: the trainer before this benchmark),
``chosen`` (every setting ``auto``: what a run uses here), and for the breakdown ``prefetch`` (eager fp32
with the batch thread), ``compile_fp32`` (compiled, fp32, prefetch), ``bf16`` (eager bf16 autocast).

One JSON line on stdout with ``eager_fp32_it_s``, ``chosen_it_s``, ``speedup``, ``dice_eager_fp32``,
``dice_chosen``, ``cpu_flags`` and the machine; the result file is
``benchmarks/results/trainer_speed[_quick].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, SHARED, machine_info, setup_logging
from pipeline import hardware
from pipeline.atomic import atomic_write_text
from pipeline.config import load_config
from pipeline.data.dataset import load_image, load_label, read_data
from pipeline.data.splits import resolve_split
from pipeline.evaluation import EvalVolume, evaluate_model, round_means
from pipeline.training.loop import SpecialistTrainer, TrainVolume

log = logging.getLogger("benchmarks.trainer_speed")
ACDC = Path(os.environ.get("SEMISAM_ACDC", SHARED / "acdc"))
"""The ACDC folder (SSL4MIS layout): ../shared/data/acdc, or $SEMISAM_ACDC (benchmarks.gpu_check sets it)."""

PATHS: dict[str, dict] = {
    "eager_fp32": {"precision": "fp32", "channels_last": False, "compile": False, "prefetch_batches": 0},
    "chosen": {},
    "prefetch": {"precision": "fp32", "channels_last": False, "compile": False},
    "compile_fp32": {"precision": "fp32", "channels_last": False, "compile": True},
    "bf16": {"precision": "bf16", "channels_last": False, "compile": False},
}


def _config(path: str):
    """conf/acdc.yaml with the path's trainer settings (its own ``train.iterations``: ``auto`` decides for
    the preset's round, although the benchmark trains fewer iterations)."""
    overrides = [f"data.root={ACDC}", "train.log_every=1000000"]
    overrides += [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in PATHS[path].items()]
    return load_config(ROOT / "conf" / "acdc.yaml", overrides)


def _volumes(cfg, test_cases: int):
    info = read_data(cfg.data)
    split = resolve_split(cfg.data, info)
    norm = cfg.data.normalization
    labeled = [TrainVolume(c, load_image(info, c, norm)[0], load_label(info, c)) for c in split.labeled]
    unlabeled = [TrainVolume(c, load_image(info, c, norm)[0]) for c in split.unlabeled]
    test = []
    for c in split.test[:test_cases]:
        image, spacing = load_image(info, c, norm)
        test.append(EvalVolume(c, image, load_label(info, c), spacing))
    return info, labeled, unlabeled, test


def run(paths: list[str], iterations: int, chunk: int, test_cases: int, device: torch.device) -> dict:
    if device.type == "cpu":
        torch.set_num_threads(2)
    cfgs = {p: _config(p) for p in paths}
    info, labeled, unlabeled, test = _volumes(cfgs[paths[0]], test_cases)
    trainers = {p: SpecialistTrainer(cfgs[p], info.num_classes, device) for p in paths}
    first_s = {p: 0.0 for p in paths}
    timed_s = {p: 0.0 for p in paths}
    timed_it = {p: 0 for p in paths}
    turns = max(2, iterations // chunk)
    for turn in range(turns):
        for p in paths:
            t0 = time.perf_counter()
            trainers[p].train(labeled, unlabeled, None, chunk)
            seconds = time.perf_counter() - t0
            if turn == 0:
                first_s[p] = seconds
            else:
                timed_s[p] += seconds
                timed_it[p] += chunk
        log.info("turn %d/%d: %s", turn + 1, turns,
                 ", ".join(f"{p} {timed_it[p] / timed_s[p]:.3f} it/s" if timed_s[p] else f"{p} first {first_s[p]:.0f} s"
                           for p in paths))
    rows = {}
    for p in paths:
        t = trainers[p]
        df = evaluate_model(t.student, test, cfgs[p], info.foreground_classes, device)
        means = round_means(df)
        rows[p] = {"it_s": timed_it[p] / timed_s[p], "first_turn_s": first_s[p], "iterations": turns * chunk,
                   "dice": means["dice"], "dice_per_class": {k: v for k, v in means.items() if k.startswith("dice_class")},
                   "runtime": t.runtime.describe()}
        log.info("%s: %.3f it/s, first turn %.0f s, test Dice %.3f", p, rows[p]["it_s"], first_s[p], means["dice"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 iterations a path in turns of 20, 8 test volumes")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--test-cases", type=int, default=None)
    ap.add_argument("--paths", nargs="+", default=None, choices=sorted(PATHS))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (benchmarks.gpu_check)")
    ap.add_argument("--out", type=Path, default=None, help="the result file (default benchmarks/results/...)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose, log)
    if not ACDC.exists():
        log.error("%s is absent: this benchmark needs the ACDC set (../shared/data/acdc or $SEMISAM_ACDC)", ACDC)
        return 2
    iterations = args.iterations or (100 if args.quick else 600)
    chunk = args.chunk or (20 if args.quick else 50)
    test_cases = args.test_cases or (8 if args.quick else 40)
    paths = args.paths or (["eager_fp32", "chosen"] if args.quick else list(PATHS))
    if "eager_fp32" not in paths or "chosen" not in paths:
        paths = ["eager_fp32", "chosen", *[p for p in paths if p not in ("eager_fp32", "chosen")]]
    t0 = time.time()
    rows = run(paths, iterations, chunk, test_cases, torch.device(args.device))
    machine = hardware.describe()
    summary = {
        "eager_fp32_it_s": round(rows["eager_fp32"]["it_s"], 4), "chosen_it_s": round(rows["chosen"]["it_s"], 4),
        "speedup": round(rows["chosen"]["it_s"] / rows["eager_fp32"]["it_s"], 3),
        "dice_eager_fp32": round(rows["eager_fp32"]["dice"], 4), "dice_chosen": round(rows["chosen"]["dice"], 4),
        "chosen": rows["chosen"]["runtime"], "cpu_flags": list(machine.cpu_flags),
        "cpu_model": machine.cpu_model, "cpu_capability": machine.cpu_capability,
        "native_bf16": machine.cpu_native_bf16,
    }
    result = {"command": "python -m benchmarks.trainer_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**machine_info(), **machine.as_dict()}, "seconds": round(time.time() - t0),
              "setting": {"iterations_per_path": rows["chosen"]["iterations"], "chunk": chunk,
                          "test_cases": test_cases, "config": "conf/acdc.yaml, mean_teacher, no pseudo-labels"},
              "summary": summary, "paths": rows}
    out = args.out or RESULTS / ("trainer_speed_quick.json" if args.quick else "trainer_speed.json")
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
