"""Overlapped rounds (``workers.overlap``, issue 19): the trainer trains while the SAM pool relabels.

A real local Ray (2 CPUs), real stores. Asserted: training round r uses the masks of checkpoint r - 2
(store r - 1; none in round 1), store r is made by checkpoint r - 1 as in sequential mode and records
``trained_in_round`` = r + 1, the two halves really ran at the same time, and the fault tests' promises
hold in this mode too (a killed SAM actor, a killed trainer, a stopped driver: exactly once, and the same
numbers as the run without the fault).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.resume import prepare_run_dir
from pipeline.store import PseudoLabelStore
from pipeline.verify import verify_run
from tests.conftest import assert_exactly_once, fault_config, run_to_end, unlabeled_cases

pytestmark = pytest.mark.ray

ITERATIONS = 60
ROUNDS = 4


def _overlap_config(data, out, **sections):
    workers = {"overlap": True, "faults": {"placement_timeout_s": 120}, **sections.pop("workers", {})}
    return fault_config(data, out, rounds=ROUNDS, train={"iterations": ITERATIONS}, workers=workers, **sections)


@pytest.fixture(scope="module")
def reference(ray_cluster, data12, tmp_path_factory):
    """An overlapped 4-round run without a fault, and the order of its events."""
    cfg = _overlap_config(data12, tmp_path_factory.mktemp("overlap"))
    events: list[tuple[str, int]] = []
    _, summaries = run_to_end(cfg, lambda event, c, **kw: events.append((event, kw.get("round"))))
    return cfg, summaries, events


def _same_result(summaries, reference) -> None:
    _, ref, _ = reference
    assert [s.round for s in summaries] == list(range(ROUNDS))
    for s, want in zip(summaries, ref, strict=True):
        assert s.train["step"] == want.train["step"], s.round
        assert s.test.get("dice") == pytest.approx(want.test.get("dice"), abs=1e-6), s.round


def test_training_uses_the_masks_one_round_stale(reference):
    cfg, summaries, _ = reference
    assert [s.train.get("pseudo_round") for s in summaries] == [None, -1, 1, 2]  # round 1: no store 0 yet
    assert [s.train["step"] for s in summaries] == [ITERATIONS * (r + 1) for r in range(ROUNDS)]
    assert [bool(s.relabel) for s in summaries] == [False, True, True, False]  # the last round relabels nothing
    store = PseudoLabelStore(cfg.run_dir / "pseudo_labels")
    assert store.rounds() == [1, 2]
    assert_exactly_once(cfg, [1, 2])
    state = json.loads((Path(cfg.run_dir) / "state.json").read_text())
    for r in (1, 2):
        m = store.manifest(r)
        assert set(m["checkpoint_version"]) == {r - 1}  # store r is made by checkpoint r - 1, as sequentially
        assert set(m["checkpoint_sha256"]) == {state["checkpoints"][str(r - 1)]}
        assert set(m["trained_in_round"]) == {r + 1}  # ... and used one round later: recorded
        assert summaries[r].relabel["trained_in_round"] == r + 1
    assert verify_run(cfg.run_dir).ok


def test_the_trainer_trains_while_the_pool_relabels(reference):
    """Round 2's training started before its relabeling finished (cases kept coming back after it)."""
    _, _, events = reference
    start = events.index(("train_start", 2))
    assert ("task_done", 2) in events[start + 1:], events


def test_sequential_rounds_record_no_staleness(finished):
    store = PseudoLabelStore(finished.run_dir / "pseudo_labels")
    for r in store.rounds():
        assert set(store.manifest(r)["trained_in_round"]) == {r}


def test_killed_sam_actor_in_an_overlapped_round(reference, data12, tmp_path):
    cfg = _overlap_config(data12, tmp_path)
    killed: list[int] = []

    def kill_a_worker(event, c, **kw):
        if event == "task_done" and kw["round"] == 2 and not killed:
            victim = c.pool.ready()[-1]
            killed.append(victim.info["pid"])
            os.kill(victim.info["pid"], signal.SIGKILL)

    _, summaries = run_to_end(cfg, kill_a_worker)
    assert killed
    assert summaries[2].relabel["failed_cases"] == {} and summaries[2].relabel["cases"] == len(unlabeled_cases(cfg))
    assert_exactly_once(cfg, [1, 2])
    _same_result(summaries, reference)


def test_killed_trainer_while_the_pool_relabels(reference, data12, tmp_path):
    cfg = _overlap_config(data12, tmp_path)
    killed: list[int] = []

    def kill_trainer_soon(event, c, **kw):
        if event == "train_start" and kw["round"] == 2 and not killed:
            killed.append(c.trainer_info["pid"])
            threading.Timer(0.5, os.kill, (killed[0], signal.SIGKILL)).start()

    c, summaries = run_to_end(cfg, kill_trainer_soon)
    assert killed and c.trainer_restarts == 1
    assert_exactly_once(cfg, [1, 2])
    _same_result(summaries, reference)


class _DriverDies(Exception):
    pass


def test_driver_stopped_mid_overlapped_round_resumes_to_the_same_result(reference, data12, tmp_path):
    cfg = _overlap_config(data12, tmp_path)
    seen: list[int] = []

    def die(event, c, **kw):
        if event == "task_done" and kw["round"] == 2:
            seen.append(1)
            if len(seen) == 2:  # some cases of round 2 are in, training round 2 is running
                raise _DriverDies

    with pytest.raises(_DriverDies):
        run_to_end(cfg, die)
    assert json.loads((Path(cfg.run_dir) / "state.json").read_text())["completed"] == [0, 1]
    _, summaries = run_to_end(cfg)
    assert_exactly_once(cfg, [1, 2])
    _same_result(summaries, reference)


def test_overlap_cannot_be_switched_when_resuming(reference, tmp_path):
    cfg, _, _ = reference
    d = cfg.model_dump(mode="json")
    d["workers"]["overlap"] = False
    with pytest.raises(ConfigError, match="workers.overlap"):
        prepare_run_dir(config_from_dict(d))
