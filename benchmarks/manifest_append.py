"""Manifest append cost against manifest size: the partitioned manifest vs the old single file.

    .venv/bin/python -m benchmarks.manifest_append            # 100 .. 10 million rows (~10 min, ~6 GiB disk)
    .venv/bin/python -m benchmarks.manifest_append --quick    # 100 .. 100 000 rows

For each size N a manifest of N realistic rows is laid down (one fastparquet part of up to 1 million
rows, copied to reach N), then one case's rows (48 slices) are appended ``--repeats`` times:

- **parts** (this semisam): ``PseudoLabelStore.append_manifest``, one new part file written atomically;
- **single file** (semisam before issue 7): copy the one ``manifest.parquet`` beside itself, append with
  fastparquet, rename over it (what the old ``append_manifest`` did when no rows were replaced).

Median milliseconds per append go to ``benchmarks/results/manifest_append.json`` with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import fastparquet
import numpy as np
import pandas as pd

from benchmarks.common import machine_info, setup_logging
from pipeline.store import PseudoLabelStore, _typed

log = logging.getLogger("benchmarks.manifest_append")
RESULT = Path(__file__).resolve().parent / "results" / "manifest_append.json"
CASE_SLICES = 48
PART_ROWS = 1_000_000


def rows(n: int, round_index: int = 1, start_case: int = 0) -> pd.DataFrame:
    """n manifest rows shaped like a real round (48 slices a case, JSON prompts and scores)."""
    i = np.arange(n)
    case = start_case + i // CASE_SLICES
    prompt = json.dumps([{"class_id": 1, "points_xy": [[12, 30], [14, 28], [3, 3]], "point_labels": [1, 1, 0],
                          "box_xyxy": [8, 20, 19, 37], "mask_prompt": False}])
    df = pd.DataFrame({
        "round": round_index, "case_id": [f"case_{c:07d}" for c in case], "slice": i % CASE_SLICES,
        "checkpoint_version": round_index - 1, "generalist": "random-walker", "num_prompts": 1,
        "prompts": prompt, "score_mean": 0.8, "scores": '{"1": 0.8}', "pseudo_fg_fraction": 0.05,
        "specialist_fg_fraction": 0.05, "agreement_dice": 0.9, "embedding_cached": False})
    return _typed(df)


def lay_down(store: PseudoLabelStore, single: Path, n: int) -> None:
    """A parts manifest and a single-file manifest of n rows each."""
    base = rows(min(n, PART_ROWS))
    store.append_manifest(base)
    first = store.parts()[0]
    fastparquet.write(str(single), base, stats=False)
    copies = (n - len(base)) // len(base)
    for k in range(copies):
        shutil.copyfile(first.path, Path(first.path).with_name(f"part-r001-{k + 1:020d}-copy{k:04d}.parquet"))
        fastparquet.write(str(single), base, append=True, stats=False)


def old_append(path: Path, new: pd.DataFrame) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".parquet")
    os.close(fd)
    shutil.copyfile(path, tmp)
    fastparquet.write(tmp, new, append=True, stats=False)
    os.replace(tmp, path)


def measure(n: int, repeats: int, scratch: Path) -> dict:
    folder = scratch / f"n{n}"
    store = PseudoLabelStore(folder / "store", create=True, class_ids=[1])
    single = folder / "manifest.parquet"
    lay_down(store, single, n)
    new_t, old_t = [], []
    for k in range(repeats):
        batch = rows(CASE_SLICES, start_case=10**6 + k)
        t = time.perf_counter()
        store.append_manifest(batch)
        new_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        old_append(single, batch)
        old_t.append(time.perf_counter() - t)
    out = {"rows": n, "parts_ms": 1000 * statistics.median(new_t), "single_file_ms": 1000 * statistics.median(old_t),
           "single_file_mib": single.stat().st_size / 2**20, "parts": len(store.parts())}
    shutil.rmtree(folder)
    log.info("%s", out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scratch", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, log)
    sizes = [100, 10_000, 100_000] if args.quick else [100, 10_000, 1_000_000, 10_000_000]
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        results = [measure(n, args.repeats, Path(tmp)) for n in sizes]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "command": "python -m benchmarks.manifest_append" + (" --quick" if args.quick else ""),
        "date": dt.date.today().isoformat(), "machine": machine_info(), "case_rows": CASE_SLICES,
        "results": results}, indent=1))
    for r in results:
        print(f"{r['rows']:>10,} rows: parts {r['parts_ms']:8.1f} ms   single file {r['single_file_ms']:9.1f} ms "
              f"({r['single_file_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
