"""Reliability table: each injected fault, tried several times, and whether the run survived it.

    .venv/bin/python -m benchmarks.reliability --tries 3     # ~40 min on 2 cores
    .venv/bin/python -m benchmarks.reliability --tries 2 --only test_faults_silent   # some rows only

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

from benchmarks.common import ROOT, machine_info, setup_logging

log = logging.getLogger("benchmarks.reliability")
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
    # issue 16: faults that once gave wrong numbers with exit 0, or a stall (tests/test_faults_silent.py)
    ("SIGKILL the trainer while it evaluates (rounds 0 and 1)", "tests/test_faults_silent.py::test_trainer_killed_while_evaluating_resumes_from_the_rounds_own_checkpoint"),
    ("SIGSTOP the trainer mid training", "tests/test_faults_silent.py::test_stopped_trainer_is_declared_hung_killed_and_the_round_redone"),
    ("SIGSTOP one SAM actor mid relabel round", "tests/test_faults_silent.py::test_stopped_sam_actor_is_declared_hung_and_its_cases_requeued"),
    ("a lock whose pid is alive, heartbeat a day old", "tests/test_faults_silent.py::test_lock_with_a_live_pid_but_an_old_heartbeat_is_taken_over"),
    ("one bit flipped in a mask chunk (open and completed round)", "tests/test_faults_silent.py::test_flipped_bit_in_a_mask_chunk_is_named_and_the_case_redone"),
    ("pseudo-labels made by a replaced checkpoint", "tests/test_faults_silent.py::test_pseudo_labels_made_by_a_replaced_checkpoint_are_redone"),
    ("a checkpoint deleted after later rounds", "tests/test_faults_silent.py::test_deleted_checkpoint_redoes_every_round_from_it_and_what_came_from_it"),
    ("a completed round's case arrays deleted", "tests/test_faults_silent.py::test_deleted_arrays_of_a_completed_round_are_relabeled_on_resume"),
    ("a non-finite loss in round 1", "tests/test_faults_silent.py::test_non_finite_loss_stops_at_once_naming_step_and_term"),
    ("the disk fills up mid relabel round, rerun", "tests/test_faults_silent.py::test_full_disk_during_a_relabel_round_is_one_line_and_resumable"),
    ("4 SAM actors asked, 1 placeable, it dies at the end", "tests/test_faults_silent.py::test_statistics_never_wait_on_unplaced_or_dead_actors"),
    ("a pickled run checkpoint with a matching checksum (verify)", "tests/test_faults_silent.py::test_verify_flags_a_pickled_checkpoint_whatever_its_checksum"),
    ("object storage down for 3 s mid relabel round", "tests/test_object_storage.py::test_storage_outage_mid_round_is_retried"),
    ("a SAM node removed after the last round", "tests/test_cluster.py::test_a_node_lost_after_the_last_round_does_not_keep_the_driver"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None,
                   help="run only the faults whose test name contains one of these; their rows replace the "
                        "same rows of the existing results, the others are kept")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, log)
    rows = []
    chosen = [(f, t) for f, t in FAULTS if args.only is None or any(o in t for o in args.only)]
    for fault, test in chosen:
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
    for r in rows:
        r["date"] = dt.date.today().isoformat()
    if args.only is not None and RESULT.exists():  # keep the rows of the faults not run now, in FAULTS order
        kept = {r["test"]: r for r in json.loads(RESULT.read_text())["rows"]}
        kept.update({r["test"]: r for r in rows})
        rows = [kept[t] for _, t in FAULTS if t in kept]
    command = f"python -m benchmarks.reliability --tries {args.tries}"
    if args.only is not None:
        command += " --only " + " ".join(args.only)
    RESULT.write_text(json.dumps({"command": command, "date": dt.date.today().isoformat(), "machine": machine_info(),
                                  "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['fault']:<50} {r['survived']}/{r['tries']}")


if __name__ == "__main__":
    main()
