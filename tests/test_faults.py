"""Faults injected into real runs on a real local Ray (2 CPUs): issue 7's table, each with its outcome.

Every test asserts a promise of docs/faults.md: a run survives the loss of an actor, a killed driver
resumes, no case is lost or counted twice, a corrupt file is detected and named, never used.
Kills are real SIGKILLs of the actor processes, timed by the coordinator's own events (a task done, a
training round started), so they land mid-round whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.errors import CheckpointError, ConfigError, PlacementError, RunLockedError, StoreError
from pipeline.run_lock import RunLock
from pipeline.store import PseudoLabelStore
from pipeline.verify import verify_run
from semisam.launch import make_coordinator
from tests.conftest import (
    assert_exactly_once,
    copy_run,
    fault_config,
    run_to_end,
    small_config_dict,
    unlabeled_cases,
)

pytestmark = pytest.mark.ray


def test_killed_sam_actor_mid_round_loses_and_duplicates_nothing(ray_cluster, data12, tmp_path):
    cfg = fault_config(data12, tmp_path)
    killed: list[int] = []

    def kill_a_worker(event, c, **kw):
        if event == "task_done" and kw["round"] == 1 and not killed:
            victim = c.pool.ready()[-1]
            killed.append(victim.info["pid"])
            os.kill(victim.info["pid"], signal.SIGKILL)

    c, summaries = run_to_end(cfg, kill_a_worker)
    assert killed, "the kill never happened"
    assert [s.round for s in summaries] == [0, 1]
    assert summaries[1].relabel["cases"] == len(unlabeled_cases(cfg))
    assert summaries[1].relabel["failed_cases"] == {}
    assert_exactly_once(cfg, [1])
    # the killed actor came back (Ray restart) under a new pid
    assert all(m.info["pid"] != killed[0] for m in c.pool.ready())


def test_killed_trainer_mid_training_is_restarted_from_the_last_checkpoint(ray_cluster, data12, tmp_path):
    cfg = fault_config(data12, tmp_path, train={"iterations": 60})
    killed: list[int] = []

    def kill_trainer_soon(event, c, **kw):
        if event == "train_start" and kw["round"] == 1 and not killed:
            pid = c.trainer_info["pid"]
            killed.append(pid)
            threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()

    c, summaries = run_to_end(cfg, kill_trainer_soon)
    assert killed and c.trainer_restarts == 1
    assert c.trainer_info["pid"] != killed[0]
    assert [s.round for s in summaries] == [0, 1]
    # the redone round started from checkpoint 0: 60 iterations of round 0 + 60 of round 1
    assert summaries[1].train["step"] == 120
    state = json.loads((cfg.run_dir / "state.json").read_text())
    assert state["completed"] == [0, 1]
    assert_exactly_once(cfg, [1])


def test_killed_trainer_in_round_0_restarts_from_scratch(ray_cluster, data12, tmp_path):
    """Mid round 0 there is no checkpoint yet: the restarted trainer starts the round again."""
    cfg = fault_config(data12, tmp_path, rounds=1, train={"iterations": 60})
    killed: list[int] = []

    def kill(event, c, **kw):
        if event == "train_start" and not killed:
            killed.append(c.trainer_info["pid"])
            threading.Timer(0.5, os.kill, (killed[0], signal.SIGKILL)).start()

    c, summaries = run_to_end(cfg, kill)
    assert c.trainer_restarts == 1 and summaries[0].train["step"] == 60


def test_flipped_checkpoint_is_refused_on_resume_and_named(finished, tmp_path):
    cfg = copy_run(finished, tmp_path, rounds=4)
    ckpt = Path(cfg.run_dir) / "checkpoints" / "ckpt_0002.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 4096])
    ckpt.write_bytes(bytes(data))
    c = make_coordinator(cfg)
    try:
        with pytest.raises(CheckpointError, match="ckpt_0002.pt is corrupt"):
            c.run()
    finally:
        c.shutdown()
    assert (Path(cfg.run_dir) / "checkpoints").exists() and not (Path(cfg.run_dir) / "checkpoints" / "ckpt_0003.pt").exists()
    report = verify_run(cfg.run_dir)
    assert any("ckpt_0002.pt is corrupt" in p for p in report.problems)


def test_deleted_case_arrays_are_redone_on_resume(finished, tmp_path):
    """Round 2 was relabeled but its training not finished (the driver died): one case's array is gone."""
    cfg = copy_run(finished, tmp_path, completed=[0, 1])
    victim = unlabeled_cases(cfg)[2]
    shutil.rmtree(Path(cfg.run_dir) / "pseudo_labels" / "masks.zarr" / "round_002" / victim / "pseudo_label")
    report = verify_run(cfg.run_dir)
    assert any(victim in p and "arrays are missing" in p for p in report.problems)
    before = {p.name for p in PseudoLabelStore(cfg.run_dir / "pseudo_labels").parts(2)}
    _, summaries = run_to_end(cfg)
    assert [s.round for s in summaries] == [0, 1, 2]
    assert_exactly_once(cfg, [1, 2])
    after = {p.name for p in PseudoLabelStore(cfg.run_dir / "pseudo_labels").parts(2)}
    assert len(after - before) >= 1  # the redone case came as a new part; others were not rewritten wholesale


def test_damaged_manifest_part_is_named_before_any_work(finished, tmp_path):
    cfg = copy_run(finished, tmp_path, completed=[0, 1])
    part = PseudoLabelStore(cfg.run_dir / "pseudo_labels").parts(2)[0]
    data = part.read_bytes()
    Path(part.path).write_bytes(data[: len(data) // 3])
    c = make_coordinator(cfg)
    try:
        with pytest.raises(StoreError, match=part.name) as e:
            c.run()
        assert "delete it" in str(e.value)
    finally:
        c.shutdown()
    assert any(part.name in p for p in verify_run(cfg.run_dir).problems)


def test_second_driver_is_refused_and_a_dead_drivers_lock_taken_over(finished, tmp_path):
    cfg = copy_run(finished, tmp_path)
    with RunLock(cfg.run_dir):  # a live driver (this process) holds the folder
        with pytest.raises(RunLockedError, match="in use by another semisam driver"):
            make_coordinator(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = Path(cfg.run_dir) / "driver.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "x",
                                "started": time.time(), "heartbeat": time.time()}))
    _, summaries = run_to_end(cfg)  # the lock of a dead pid on this host is stale: taken over
    assert [s.round for s in summaries] == [0, 1, 2]
    assert not lock.exists()  # released at the end


def test_pickled_sam_checkpoint_is_refused_before_any_training(data12, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    cfg = config_from_dict(small_config_dict(data12, tmp_path / "runs", sam_checkpoint=bad))
    with pytest.raises(CheckpointError, match="evil.pth") as e:
        make_coordinator(cfg)
    assert "weights-only" in str(e.value)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "runs" / "test" / "checkpoints").exists()  # nothing trained
    # a real checkpoint of another variant is named with what it looks like
    from pipeline.generalist.sam import build_sam_model

    torch.save(build_sam_model("tiny").state_dict(), tmp_path / "tiny.pth")
    cfg = config_from_dict(small_config_dict(data12, tmp_path / "runs", sam_checkpoint=tmp_path / "tiny.pth",
                                             generalist={"backend": "sam", "sam": {"variant": "vit_b",
                                                                                   "checkpoint": str(tmp_path / "tiny.pth")}}))
    with pytest.raises(CheckpointError, match="does not match variant vit_b"):
        make_coordinator(cfg)


def test_over_asked_pool_starts_with_what_fits(ray_cluster, data12, tmp_path):
    """Issue 8: 8 SAM actors on a cluster that can place 1 waited forever; now the run starts with 1."""
    cfg = fault_config(data12, tmp_path, workers={"sam": {"num_workers": 8, "num_cpus": 1.0, "torch_threads": 1}})
    c, summaries = run_to_end(cfg)
    assert summaries[1].relabel["cases"] == len(unlabeled_cases(cfg))
    assert summaries[1].relabel["workers_ready"] == 1
    assert_exactly_once(cfg, [1])


def test_unplaceable_requests_stop_at_once_with_the_missing_resources(ray_cluster, data12, tmp_path):
    cfg = fault_config(data12, tmp_path, workers={"sam": {"num_workers": 8, "num_cpus": 1.0, "min_workers": 4}})
    t = time.monotonic()
    with pytest.raises(PlacementError, match="8 SAM actors of 1 CPU each were asked for, the cluster can place 1"):
        make_coordinator(cfg)
    cfg = fault_config(data12, tmp_path, workers={"trainer": {"num_gpus": 1}})
    with pytest.raises(PlacementError, match="no node can hold the trainer \\(1 CPU, 1 GPU"):
        make_coordinator(cfg)
    assert time.monotonic() - t < 30  # refused up front, not after a placement timeout
    assert not (Path(cfg.run_dir) / "driver.lock").exists()


def test_auto_pool_size_is_what_fits(ray_cluster, data12, tmp_path):
    cfg = fault_config(data12, tmp_path, rounds=1, workers={"sam": {"num_workers": "auto", "num_cpus": 0.25}})
    c = make_coordinator(cfg)
    try:
        assert c.sam_wanted == 6  # (2 CPUs - 0.5 for the trainer) / 0.25
    finally:
        c.shutdown()


def test_warm_start_takes_the_sources_round_0(finished, data12, tmp_path):
    """Issue 10: two runs that differ only in the pseudo-label term shared nothing and both trained round 0."""
    src_state = json.loads((finished.run_dir / "state.json").read_text())
    cfg = fault_config(data12, tmp_path, name="warm", train={"init_from": str(finished.run_dir),
                                                     "pseudo_label": {"weight": 0.2}})
    c, summaries = run_to_end(cfg)
    assert [s.round for s in summaries] == [0, 1]
    assert summaries[0].test == src_state["summaries"][0]["test"]            # the source's round-0 metrics
    assert (cfg.run_dir / "checkpoints" / "ckpt_0000.pt").read_bytes() == \
        (finished.run_dir / "checkpoints" / "ckpt_0000.pt").read_bytes()
    state = json.loads((cfg.run_dir / "state.json").read_text())
    assert state["init_from"]["sha256"] == src_state["checkpoints"]["0"]
    assert summaries[1].train["step"] == 2 * cfg.train.iterations          # round 1 went on from its step
    assert verify_run(cfg.run_dir).ok
    other = fault_config(data12, tmp_path, name="warm2", train={"init_from": str(finished.run_dir), "lr": 0.5})
    with pytest.raises(ConfigError, match="differs in: train.lr"):
        run_to_end(other)
