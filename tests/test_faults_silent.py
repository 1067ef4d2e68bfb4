"""Faults that once ended in wrong numbers with exit 0, or in a silent stall (issue 16), injected from outside
into real runs on a real local Ray (2 CPUs), as in tests/test_faults.py.

Each ends one of two ways: the same result as the run without the fault (``reference``: training draws
its randomness from (seed, step), so a round redone from its checkpoint reproduces it exactly), or a
one-line error that names what is wrong and what to do. Kills and stops are real signals to the actor
processes, timed by the coordinator's own events.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.common import fill_disk
from pipeline.checkpoint import checkpoint_path, load_checkpoint
from pipeline.errors import NonFiniteError, RunLockedError, StoreError
from pipeline.run_lock import RunLock
from pipeline.store import PseudoLabelStore, read_part
from pipeline.verify import verify_run
from semisam.launch import run_with_stats
from tests.conftest import assert_exactly_once, copy_run, fault_config, run_to_end, unlabeled_cases

pytestmark = pytest.mark.ray

ITERATIONS = 60  # long enough that a signal sent 0.5 s into a training round lands inside it


def _state(cfg) -> dict:
    return json.loads((Path(cfg.run_dir) / "state.json").read_text())


def _eval_sha(cfg, r: int) -> set[str]:
    return set(pd.read_parquet(Path(cfg.run_dir) / "eval" / f"round_{r:03d}.parquet")["checkpoint_sha256"])


def _store(cfg) -> PseudoLabelStore:
    return PseudoLabelStore(cfg.run_dir / "pseudo_labels")


def _chunk(cfg, r: int, case: str, array: str = "pseudo_label") -> Path:
    return Path(cfg.run_dir) / "pseudo_labels" / "masks.zarr" / f"round_{r:03d}" / case / array / "c" / "0" / "0" / "0"


def _assert_chain(cfg) -> None:
    """Every eval table and pseudo-label row records the checkpoint state.json says it came from."""
    state = _state(cfg)
    for r in state["completed"]:
        if (Path(cfg.run_dir) / "eval" / f"round_{r:03d}.parquet").exists():
            assert _eval_sha(cfg, r) == {state["checkpoints"][str(r)]}, r
        if r > 0:
            assert set(_store(cfg).manifest(r)["checkpoint_sha256"]) == {state["checkpoints"][str(r - 1)]}, r


@pytest.fixture(scope="module")
def reference(ray_cluster, data12, tmp_path_factory):
    """The 2-round run without a fault that the faulted runs must reproduce."""
    cfg = fault_config(data12, tmp_path_factory.mktemp("reference"), train={"iterations": ITERATIONS})
    _, summaries = run_to_end(cfg)
    return cfg, summaries


def _same_result(summaries, reference) -> None:
    _, ref = reference
    assert [s.round for s in summaries] == [0, 1]
    for s, want in zip(summaries, ref, strict=True):
        assert s.test["dice"] == pytest.approx(want.test["dice"], abs=1e-6), s.round
        assert s.train["step"] == want.train["step"]


# 1 -----------------------------------------------------------------------------------------------------
def test_trainer_killed_while_evaluating_resumes_from_the_rounds_own_checkpoint(reference, data12, tmp_path):
    """Killed after publishing checkpoint r, while evaluating it: the restarted trainer used to reload
    checkpoint r - 1 (or nothing in round 0) and evaluate and continue from that: test Dice 0.09 against
    0.79, and a ckpt_0001 holding ckpt_0000's step."""
    cfg = fault_config(data12, tmp_path, train={"iterations": ITERATIONS})
    killed: list[int] = []

    def kill_after_publish(event, c, **kw):
        if event == "published":
            killed.append(c.trainer_info["pid"])
            os.kill(killed[-1], signal.SIGKILL)

    c, summaries = run_to_end(cfg, kill_after_publish)
    assert len(killed) == 2 and c.trainer_restarts == 2
    _same_result(summaries, reference)
    assert load_checkpoint(checkpoint_path(cfg.run_dir, 1))["trainer"]["step"] == 2 * ITERATIONS
    _assert_chain(cfg)
    assert_exactly_once(cfg, [1])


# 3 (trainer) ---------------------------------------------------------------------------------------------
def test_stopped_trainer_is_declared_hung_killed_and_the_round_redone(reference, data12, tmp_path, caplog):
    """SIGSTOP, not SIGKILL: Ray sees a live process, so only the heartbeat notices. 8 s, not 3: with the
    suite's two processes on 2 cores a restarted trainer once missed a 3 s heartbeat while loading its data."""
    cfg = fault_config(data12, tmp_path, train={"iterations": ITERATIONS},
                       workers={"faults": {"placement_timeout_s": 120, "hung_after_s": 8}})
    stopped: list[int] = []

    def stop_trainer(event, c, **kw):
        if event == "train_start" and kw["round"] == 1 and not stopped:
            stopped.append(c.trainer_info["pid"])
            threading.Timer(0.5, os.kill, (stopped[0], signal.SIGSTOP)).start()

    with caplog.at_level(logging.ERROR, logger="pipeline.coordinator"):
        c, summaries = run_to_end(cfg, stop_trainer)
    assert stopped and c.trainer_restarts == 1 and c.trainer_info["pid"] != stopped[0]
    assert any("the trainer" in r.message and "is hung" in r.message for r in caplog.records)
    _same_result(summaries, reference)
    _assert_chain(cfg)


# 3 (SAM actor) -------------------------------------------------------------------------------------------
def test_stopped_sam_actor_is_declared_hung_and_its_cases_requeued(ray_cluster, data12, tmp_path, caplog):
    cfg = fault_config(data12, tmp_path, workers={"faults": {"placement_timeout_s": 120, "hung_after_s": 2,
                                                             "hung_factor": 5}})
    stopped: list[int] = []

    def stop_a_worker(event, c, **kw):
        if event == "task_done" and kw["round"] == 1 and not stopped:
            victim = c.pool.members[kw["member"]]
            stopped.append(victim.info["pid"])
            os.kill(victim.info["pid"], signal.SIGSTOP)

    with caplog.at_level(logging.ERROR, logger="pipeline.coordinator"):
        c, summaries = run_to_end(cfg, stop_a_worker)
    assert stopped
    hung = [r.message for r in caplog.records if "declared hung" in r.message]
    assert hung and "SAM worker" in hung[0]
    assert summaries[1].relabel["cases"] == len(unlabeled_cases(cfg))
    assert summaries[1].relabel["failed_cases"] == {}
    assert_exactly_once(cfg, [1])
    with pytest.raises(ProcessLookupError):  # killed, not left stopped
        for _ in range(100):
            os.kill(stopped[0], 0)
            time.sleep(0.1)


# 4 -------------------------------------------------------------------------------------------------------
def test_lock_with_a_live_pid_but_an_old_heartbeat_is_taken_over(tmp_path):
    """A pid reused after a reboot: alive, but not our driver. Its day-old heartbeat decides."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "driver.lock"
    other = {"host": os.uname().nodename, "pid": os.getppid(), "token": "x", "started": time.time() - 86400}
    lock.write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(RunLockedError) as e:
        RunLock(run_dir, stale_after_s=60).acquire()
    assert f"delete {lock}" in str(e.value) and "heartbeat is 60 s old" in str(e.value)
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 86400}))
    held = RunLock(run_dir, stale_after_s=60).acquire()
    try:
        assert json.loads(lock.read_text())["token"] == held.token
    finally:
        held.release()


# 2 -------------------------------------------------------------------------------------------------------
def test_flipped_bit_in_a_mask_chunk_is_named_and_the_case_redone(finished, tmp_path):
    """Round 2 relabeled, not yet trained; round 1 completed. One bit flipped in a chunk of each: zstd alone
    decoded 1,083 of 5,704 such flips silently to other data; the CRC-32C catches every one."""
    cfg = copy_run(finished, tmp_path, completed=[0, 1])
    case2, case1 = unlabeled_cases(cfg)[3], unlabeled_cases(cfg)[5]
    original = {r: _store(cfg).read_case(r, c)["pseudo_label"] for r, c in ((2, case2), (1, case1))}
    for r, c in ((2, case2), (1, case1)):
        chunk = _chunk(cfg, r, c)
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x04
        chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"case {case2} of round 2 is damaged: a chunk fails its CRC-32C"):
        _store(cfg).read_case(2, case2)
    problems = verify_run(cfg.run_dir).problems
    assert any(f"round 2 case {case2} is damaged" in p for p in problems)
    assert any(f"round 1 case {case1} is damaged" in p for p in problems)
    _, summaries = run_to_end(cfg)
    assert [s.round for s in summaries] == [0, 1, 2]
    for r, c in ((2, case2), (1, case1)):  # relabeled with the checkpoint that made them: the same masks
        np.testing.assert_array_equal(_store(cfg).read_case(r, c)["pseudo_label"], original[r])
    assert_exactly_once(cfg, [1, 2])
    _assert_chain(cfg)


# 5 -------------------------------------------------------------------------------------------------------
def test_pseudo_labels_made_by_a_replaced_checkpoint_are_redone(finished, tmp_path):
    """Round 2's pseudo-labels say they came from another checkpoint 1 than state.json records (as after
    ckpt_0001 was deleted and round 1 retrained with a new SHA-256): they used to be reused ("0 to go")."""
    cfg = copy_run(finished, tmp_path, completed=[0, 1])
    store = _store(cfg)
    for part in store.parts(2):
        df = read_part(part)
        part.remove()
        store._write_part(2, df.assign(checkpoint_sha256="0" * 64))
    report = verify_run(cfg.run_dir)
    assert any("round 2: 7 cases were made by another checkpoint 1" in p for p in report.problems), report.text()
    _, summaries = run_to_end(cfg)
    assert summaries[2].relabel["relabeled_now"] == len(unlabeled_cases(cfg))
    _assert_chain(cfg)
    assert_exactly_once(cfg, [1, 2])


def test_deleted_checkpoint_redoes_every_round_from_it_and_what_came_from_it(finished, tmp_path):
    cfg = copy_run(finished, tmp_path)
    for p in (Path(cfg.run_dir) / "checkpoints").glob("ckpt_0001.pt*"):
        p.unlink()
    _, summaries = run_to_end(cfg)
    assert [s.round for s in summaries] == [0, 1, 2]
    _assert_chain(cfg)
    assert_exactly_once(cfg, [1, 2])


def test_deleted_arrays_of_a_completed_round_are_relabeled_on_resume(finished, tmp_path):
    """verify used to say that a rerun redoes the case, and two reruns did not."""
    cfg = copy_run(finished, tmp_path)
    victim = unlabeled_cases(cfg)[1]
    original = _store(cfg).read_case(1, victim)["pseudo_label"]
    case_dir = Path(cfg.run_dir) / "pseudo_labels" / "masks.zarr" / "round_001" / victim
    subprocess.run(["rm", "-r", str(case_dir)], check=True)
    assert any(victim in p and "a rerun of `semisam run` redoes it" in p for p in verify_run(cfg.run_dir).problems)
    before = _state(cfg)
    _, summaries = run_to_end(cfg)
    assert _state(cfg)["checkpoints"] == before["checkpoints"]  # nothing retrained
    np.testing.assert_array_equal(_store(cfg).read_case(1, victim)["pseudo_label"], original)
    assert_exactly_once(cfg, [1, 2])


# 6 -------------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_at_once_naming_step_and_term(ray_cluster, data12, tmp_path):
    """Round 0 trains normally; the pseudo-label term, which starts in round 1, is weighted 1e30 (finite, so
    the config takes it): the loss becomes NaN within a few steps. It used to end in test Dice 0, exit 0."""
    cfg = fault_config(data12, tmp_path, train={"iterations": 30, "optimizer": "sgd", "pseudo_label": {"weight": 1e30}})
    with pytest.raises(NonFiniteError, match=r"training stopped at step 3\d: the \w+ term is (nan|inf)") as e:
        run_to_end(cfg)
    assert "nothing is published, the last good checkpoint is kept" in str(e.value)
    state = _state(cfg)
    assert state["completed"] == [0] and not checkpoint_path(cfg.run_dir, 1).exists()
    load_checkpoint(checkpoint_path(cfg.run_dir, 0), expect_sha256=state["checkpoints"]["0"])  # intact


# 7 -------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only; skipped elsewhere): a disk that can really fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk test needs a disk that fills")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_during_a_relabel_round_is_one_line_and_resumable(ray_cluster, data12, small_disk):
    cfg = fault_config(data12, small_disk / "runs")
    filled: list[Path] = []

    def fill_up(event, c, **kw):
        if event == "task_done" and kw["round"] == 1 and not filled:
            filled.append(fill_disk(small_disk))

    with pytest.raises(StoreError) as e:
        run_to_end(cfg, fill_up)
    message = str(e.value)
    assert "the disk is full" in message and str(small_disk) in message and "rerun the same command" in message
    assert "\n" not in message
    filled[0].unlink()
    _, summaries = run_to_end(cfg)
    assert [s.round for s in summaries] == [0, 1]
    assert_exactly_once(cfg, [1])


# 8 -------------------------------------------------------------------------------------------------------
def test_statistics_never_wait_on_unplaced_or_dead_actors(ray_cluster, data12, tmp_path):
    """4 SAM actors asked, 1 placeable, and that one killed after the last round: the driver used to block
    forever in worker_stats (ray.get on actors never placed), or die there with ActorUnavailableError."""
    cfg = fault_config(data12, tmp_path, workers={"sam": {"num_workers": 4, "num_cpus": 1.0, "torch_threads": 1}})
    killed: list[int] = []

    def kill_last(event, c, **kw):
        if event == "round_done" and kw["round"] == 1:
            killed.append(c.pool.ready()[0].info["pid"])
            os.kill(killed[0], signal.SIGKILL)

    summaries, stats = run_with_stats(cfg, kill_last)
    assert killed and [s.round for s in summaries] == [0, 1]
    assert all(s["pid"] != killed[0] for s in stats)  # the dead one is left out, never waited on forever
    assert_exactly_once(cfg, [1])


# 9 -------------------------------------------------------------------------------------------------------
def test_verify_flags_a_pickled_checkpoint_whatever_its_checksum(finished, tmp_path):
    cfg = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = checkpoint_path(cfg.run_dir, 1)
    torch.save({"format": 1, "x": Evil()}, ckpt.path)
    from pipeline.storage import sha256_hex

    digest = sha256_hex(Path(ckpt.path).read_bytes())
    Path(ckpt.path + ".sha256").write_text(f"{digest}  ckpt_0001.pt\n")
    state = _state(cfg)
    state["checkpoints"]["1"] = digest
    (Path(cfg.run_dir) / "state.json").write_text(json.dumps(state))
    problems = verify_run(cfg.run_dir).problems
    assert any("ckpt_0001.pt cannot be read (weights only)" in p for p in problems), problems
    assert not marker.exists()


def test_blank_image_gets_no_prompts_and_a_warning(specialist, caplog):
    from pipeline.config import config_from_dict
    from pipeline.data.validate import warn_constant_images
    from pipeline.generalist.factory import make_generalist
    from pipeline.relabel import relabel_case
    from pipeline.training.loop import TrainVolume

    d, model, info, case_id, image = specialist
    cfg = config_from_dict(d)
    blank = np.full_like(image, image.max())  # one value everywhere, where the specialist sees foreground
    with caplog.at_level(logging.WARNING):
        assert warn_constant_images([TrainVolume("blank_case", blank), TrainVolume(case_id, image)], "unlabeled") \
            == ["blank_case"]
    assert any("unlabeled case blank_case: the image is constant" in r.message for r in caplog.records)
    gen = make_generalist(cfg.generalist, torch.device("cpu"))
    out = relabel_case("blank_case", blank, model, gen, None, cfg, info.foreground_classes, 1, 0, torch.device("cpu"))
    assert out.specialist.any(), "the specialist predicts nothing here: the test would prove nothing"
    assert all(row["num_prompts"] == 0 for row in out.rows)
    assert not out.pseudo_label.any()
    normal = relabel_case(case_id, image, model, gen, None, cfg, info.foreground_classes, 1, 0, torch.device("cpu"))
    assert any(row["num_prompts"] > 0 for row in normal.rows)  # the same path prompts a real image
