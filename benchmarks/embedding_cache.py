"""Shared embedding cache (issue 9 item 4): encoder calls of a small run matrix, each run's own cache vs one
``generalist.cache_dir`` for all, and the expected encoder calls of the quality matrix with SAM.

    .venv/bin/python -m benchmarks.embedding_cache            # 4 runs x 2 modes, tiny SAM, ~5 min on 2 CPU cores
    .venv/bin/python -m benchmarks.embedding_cache --estimate-only   # only the quality-matrix arithmetic

Measured part: synthetic MSD data (``pipeline.data.synthetic``, 10 cases: 2 test, k labeled, the rest
unlabeled) and the tiny SAM (``save_tiny_sam``: the real segment_anything classes at test size, random
weights). A matrix of four ordinary runs (``Coordinator``, one local Ray cluster of 2 CPUs shared by all)
that differ in seed, method and k, each 3 rounds (relabeling before rounds 1 and 2, as a SemiSAM cell of
the quality benchmark), is run twice: *before*, each run with its own cache in its run folder (the
default); *after*, all runs with one ``generalist.cache_dir``. Counted from the SAM actors: encoder calls
(slices through the image encoder), cache hits and misses; and the relabel-round seconds (the actors'
own timers) and whole-run seconds. The tiny encoder is cheap (0.9 ms a slice), so the seconds saved here
are lost in the noise: the encoder calls are the number that carries over to ViT-B, where one call costs
10.3 s on this machine's CPU (``benchmarks/results/perf.json``, figure online_cost).

Estimated part: the quality matrix (``benchmarks/quality.py``) runs the weight-free classical generalist,
which has no encoder and no cache, so it makes no encoder calls at all. With SAM instead, each SemiSAM cell
would embed the slices it prompts; the numbers of prompted slices per relabel round are taken from the
committed cells ``benchmarks/results/quality_v1/*-semisam-*.json`` (see ``quality_estimate`` for the
arithmetic) and scaled to the current matrix (``benchmarks.quality``: rows x k x seeds).

Results go to ``benchmarks/results/embedding_cache.json`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_info, setup_logging
from pipeline.atomic import atomic_write_text

log = logging.getLogger("benchmarks.embedding_cache")
RESULT = ROOT / "benchmarks" / "results" / "embedding_cache.json"
QUALITY_V1 = ROOT / "benchmarks" / "results" / "quality_v1"
PERF = ROOT / "benchmarks" / "results" / "perf.json"

# (name, method, seed, k): what the quality matrix varies between cells on the same data and generalist
CELLS = [("mt-s0-k2", "mean_teacher", 0, 2), ("mt-s1-k2", "mean_teacher", 1, 2),
         ("uamt-s0-k2", "uamt", 0, 2), ("mt-s0-k1", "mean_teacher", 0, 1)]
NUM_CASES = 10
ROUNDS = 3  # round 0 trains; rounds 1 and 2 relabel with the previous checkpoint (as a SemiSAM cell)


def run_config(name: str, method: str, seed: int, k: int, data: Path, out: Path, checkpoint: Path,
               cache_dir: Path | None, iterations: int):
    from pipeline.config import config_from_dict

    generalist = {"backend": "sam", "sam": {"variant": "tiny", "checkpoint": str(checkpoint)}}
    if cache_dir is not None:
        generalist["cache_dir"] = str(cache_dir)
    return config_from_dict({
        "name": name, "output_dir": str(out), "rounds": ROUNDS, "seed": seed, "device": "cpu",
        "data": {"root": str(data), "split_file": str(data / "splits.json"), "num_labeled": k},
        "model": {"kind": "unet2d", "base_channels": 4, "depth": 2, "patch_size": [32, 32]},
        "train": {"method": method, "iterations": iterations, "labeled_batch_size": 2,
                  "unlabeled_batch_size": 2, "log_every": 1000},
        "generalist": generalist,
        "eval": {"every_round": False},
        "workers": {"trainer": {"num_cpus": 1, "torch_threads": 1},
                    "sam": {"num_workers": 1, "num_cpus": 1, "torch_threads": 1}},
    }, source=f"benchmark cell {name}")


def run_one(cfg) -> dict:
    """One run to the end: its SAM actors' counters and its relabel rounds' summaries."""
    from semisam.launch import run_with_stats

    start = time.perf_counter()
    summaries, stats = run_with_stats(cfg)
    relabel = [s.relabel for s in summaries if s.relabel]
    return {
        "run": cfg.name, "seconds": round(time.perf_counter() - start, 2),
        "relabel_seconds": round(sum(s["seconds"] for s in stats), 2),
        "encoder_calls": sum(s["encoder_calls"] for s in stats),
        "cache_hits": sum(s.get("cache_hits", 0) for s in stats),
        "cache_misses": sum(s.get("cache_misses", 0) for s in stats),
        "prompted_slices": [r["prompted_slices"] for r in relabel],
        "cached_slices": [r["cached_slices"] for r in relabel],
    }


def measure(scratch: Path, iterations: int) -> dict:
    import ray

    from pipeline.data.synthetic import write_synthetic_msd
    from pipeline.generalist.sam import save_tiny_sam

    data = write_synthetic_msd(scratch / "data", num_cases=NUM_CASES, seed=1)
    checkpoint = save_tiny_sam(scratch / "tiny_sam.pt", seed=0)
    modes = {"before": None, "after": scratch / "shared_cache"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {}
    try:
        for mode, cache_dir in modes.items():
            runs = []
            for name, method, seed, k in CELLS:
                cfg = run_config(name, method, seed, k, data, scratch / mode, checkpoint, cache_dir, iterations)
                runs.append(run_one(cfg))
                log.info("%s %s: %s", mode, name, runs[-1])
            out[mode] = {"cache": "each run's own <run>/embeddings.zarr" if cache_dir is None
                         else "one generalist.cache_dir for all runs",
                         "runs": runs,
                         **{f"total_{key}": round(sum(r[key] for r in runs), 2)
                            for key in ("encoder_calls", "cache_hits", "cache_misses", "relabel_seconds", "seconds")},
                         "total_prompted_slices": sum(sum(r["prompted_slices"]) for r in runs)}
    finally:
        ray.shutdown()
    b, a = out["before"], out["after"]
    out["encoder_calls_saved"] = b["total_encoder_calls"] - a["total_encoder_calls"]
    out["encoder_call_ratio"] = round(a["total_encoder_calls"] / max(1, b["total_encoder_calls"]), 3)
    return out


def quality_estimate() -> dict:
    """Expected SAM encoder calls of the quality matrix, from its prompted-slice counts.

    Per SemiSAM cell c (rounds 1 and 2 relabel all of its unlabeled cases) let P1, P2 be the sets of
    slices prompted in rounds 1 and 2 and S the number of unlabeled slices; the committed cells give
    |P1|, |P2| and S, not the sets, so the overlaps are bounded:

    - no cache:                 sum_c |P1| + |P2|
    - each run's own cache:     sum_c |P1 u P2|, between sum_c max(|P1|, |P2|) and sum_c min(S, |P1| + |P2|)
    - one shared cache:         |u_c (P1 u P2)| <= the slices of the k=1 cells' 199 unlabeled cases (every
                                cell's unlabeled cases are among them: train_order[k:] for k >= 1), and
                                >= the largest single cell's max(|P1|, |P2|).

    The current matrix (``benchmarks.quality``: SemiSAM rows x k x seeds) is estimated with the per-cell
    means of the committed v1 cells (2 SemiSAM rows x k 1, 2, 4 x seeds 0-2, classical generalist: its
    prompts come from the same specialist as SAM's would, so the prompted slices are the same).
    """
    cells = []
    for path in sorted(QUALITY_V1.glob("*-semisam-*.json")):
        d = json.loads(path.read_text())
        rel = [r["relabel"] for r in d["rounds"] if r.get("relabel")]
        assert len(rel) == 2, path  # a SemiSAM cell relabels before rounds 1 and 2
        p1, p2, s = rel[0]["prompted_slices"], rel[1]["prompted_slices"], rel[0]["slices"]
        cells.append({"cell": d["cell"], "k": d["k"], "unlabeled_slices": s, "prompted": [p1, p2],
                      "no_cache": p1 + p2, "own_cache_low": max(p1, p2), "own_cache_high": min(s, p1 + p2)})
    if not cells:
        return {"error": f"no committed SemiSAM cells in {QUALITY_V1}"}
    all_slices = max(c["unlabeled_slices"] for c in cells if c["k"] == min(x["k"] for x in cells))
    v1 = {"cells": len(cells), **{key: sum(c[key] for c in cells) for key in ("no_cache", "own_cache_low", "own_cache_high")},
          "shared_cache_high": all_slices, "shared_cache_low": max(c["own_cache_low"] for c in cells)}
    from benchmarks.quality import KS, MATRIX_ROWS, SEEDS

    semisam_rows = [r for r in MATRIX_ROWS if "semisam" in r]
    n = len(semisam_rows) * len(KS) * len(SEEDS)
    scale = n / len(cells)
    current = {"rows": semisam_rows, "k": KS, "seeds": SEEDS, "cells": n,
               **{key: round(v1[key] * scale) for key in ("no_cache", "own_cache_low", "own_cache_high")},
               "shared_cache_high": all_slices, "shared_cache_low": v1["shared_cache_low"]}
    try:  # measured seconds per ViT-B (1024) encoder call on this machine's CPU, to put hours on the calls
        vit_b_s = json.loads(PERF.read_text())["figures"]["online_cost"]["measured"]["variants"]["vit_b"][
            "per_pass_seconds"]["encoder_s"]
        current["vit_b_cpu_hours"] = {key: round(current[key] * vit_b_s / 3600, 1)
                                      for key in ("no_cache", "own_cache_low", "own_cache_high", "shared_cache_high")}
        current["vit_b_encoder_seconds_per_call"] = vit_b_s
    except (OSError, KeyError, ValueError):
        pass
    return {"generalist_of_the_matrix": "classical (random walker): no encoder, 0 encoder calls, no cache",
            "method": quality_estimate.__doc__, "per_cell": cells, "quality_v1": v1, "current_matrix": current,
            "reduction_current_low": round(current["own_cache_low"] / all_slices, 1),
            "reduction_current_high": round(current["own_cache_high"] / all_slices, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=6, help="training iterations per round (prompts only)")
    ap.add_argument("--estimate-only", action="store_true", help="only the quality-matrix arithmetic")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose, log)
    result: dict = {"command": " ".join([".venv/bin/python -m benchmarks.embedding_cache", *(argv or sys.argv[1:])]),
                    "machine": machine_info(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                    "load_average_before": os.getloadavg()}
    start = time.perf_counter()
    if not args.estimate_only:
        with tempfile.TemporaryDirectory(prefix="semisam-embcache-") as scratch:
            result["measured"] = {"cells": [dict(zip(("name", "method", "seed", "k"), c, strict=True)) for c in CELLS],
                                  "cases": NUM_CASES, "rounds": ROUNDS, "iterations": args.iterations,
                                  "generalist": "sam-tiny", **measure(Path(scratch), args.iterations)}
    elif args.out.exists():
        result["measured"] = json.loads(args.out.read_text()).get("measured")  # keep the last measurement
    result["quality_matrix_estimate"] = quality_estimate()
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    m, q = result.get("measured"), result["quality_matrix_estimate"]
    if m:
        print(f"encoder calls: before {m['before']['total_encoder_calls']}, after {m['after']['total_encoder_calls']} "
              f"({m['encoder_call_ratio']}x); relabel seconds {m['before']['total_relabel_seconds']} -> "
              f"{m['after']['total_relabel_seconds']}; run seconds {m['before']['total_seconds']} -> "
              f"{m['after']['total_seconds']}")
    if "current_matrix" in q:
        c = q["current_matrix"]
        print(f"quality matrix with SAM ({c['cells']} SemiSAM cells): own caches {c['own_cache_low']}-{c['own_cache_high']} "
              f"encoder calls, one shared cache <= {c['shared_cache_high']} (no cache {c['no_cache']})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
