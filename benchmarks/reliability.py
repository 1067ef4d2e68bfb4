"""Reliability table: each injected fault, tried several times, and whether the run survived it.

    .venv/bin/python -m benchmarks.reliability --tries 3     # ~20 min on 2 cores

Each fault is one test of the suite (real local Ray or a real two-node ``ray.cluster_utils.Cluster``,
real SIGKILLs timed by the coordinator's events, see tests/test_faults.py, test_cluster.py,
test_driver_signals.py). A try *survived* when its test passed: the run finished (or, for corrupt
files, refused with the file named) and ``assert_exactly_once`` found every unlabeled case exactly once
in the manifest and the arrays, so a survived try lost and duplicated 0 cases. A failed try is reported
with the last lines of its output. Results: ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info, setup_logging

log = logging.getLogger("benchmarks.reliability")
ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "reliability.json"

FAULTS = [
    ("SIGKILL one SAM actor mid relabel round", "tests/test_faults.py::test_killed_sam_actor_mid_round_loses_and_duplicates_nothing"),
    ("SIGKILL the trainer mid training (round 1)", "tests/test_faults.py::test_killed_trainer_mid_training_is_restarted_from_the_last_checkpoint"),
    ("SIGKILL the trainer mid round 0", "tests/test_faults.py::test_killed_trainer_in_round_0_restarts_from_scratch"),
    ("worker node removed mid relabel round", "tests/test_cluster.py::test_losing_a_worker_node_mid_round_loses_no_case"),
    ("driver SIGKILLed mid relabel round, rerun", "tests/test_driver_signals.py::test_killed_driver_mid_relabel_resumes_exactly_once"),
    ("SIGINT / SIGTERM to the driver mid round, rerun", "tests/test_driver_signals.py::test_signal_during_training_stops_within_seconds_and_resumes"),
    ("4096 bytes flipped in a checkpoint, resume", "tests/test_faults.py::test_flipped_checkpoint_is_refused_on_resume_and_named"),
    ("a case's pseudo_label array deleted, resume", "tests/test_faults.py::test_deleted_case_arrays_are_redone_on_resume"),
    ("a manifest part truncated, resume", "tests/test_faults.py::test_damaged_manifest_part_is_named_before_any_work"),
    ("a second driver on the run folder", "tests/test_faults.py::test_second_driver_is_refused_and_a_dead_drivers_lock_taken_over"),
    ("a pickle as the SAM checkpoint", "tests/test_faults.py::test_pickled_sam_checkpoint_is_refused_before_any_training"),
    ("8 SAM actors asked, 1 placeable", "tests/test_faults.py::test_over_asked_pool_starts_with_what_fits"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, log)
    rows = []
    for fault, test in FAULTS:
        survived, seconds, failures = 0, [], []
        for k in range(args.tries):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                 cwd=ROOT, capture_output=True, text=True)
            seconds.append(time.perf_counter() - t)
            if out.returncode == 0:
                survived += 1
            else:
                failures.append(out.stdout[-1500:])
            log.info("%s try %d: %s (%.0f s)", fault, k + 1, "survived" if out.returncode == 0 else "FAILED",
                     seconds[-1])
        rows.append({"fault": fault, "test": test, "tries": args.tries, "survived": survived,
                     "cases_lost": 0 if survived == args.tries else None,
                     "cases_duplicated": 0 if survived == args.tries else None,
                     "seconds_mean": sum(seconds) / len(seconds), "failures": failures})
    RESULT.write_text(json.dumps({"command": f"python -m benchmarks.reliability --tries {args.tries}",
                                  "date": dt.date.today().isoformat(), "machine": machine_info(), "rows": rows},
                                 indent=1))
    for r in rows:
        print(f"{r['fault']:<50} {r['survived']}/{r['tries']}")


if __name__ == "__main__":
    main()
