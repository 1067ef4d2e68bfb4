"""The driver as a user runs it (`semisam run` in a subprocess, its own local Ray): Ctrl-C and SIGTERM stop
it within seconds keeping finished work, SIGKILL leaves a folder that the next run resumes, and in every
case each unlabeled case ends up exactly once in the manifest and the store."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_from_dict
from pipeline.run_lock import read_lock
from pipeline.storage import Location
from tests.conftest import assert_exactly_once, small_config_dict

pytestmark = pytest.mark.ray

SEMISAM = shutil.which("semisam", path=str(Path(sys.executable).parent))


def _start(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([SEMISAM, "run", str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"semisam run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached the point to interrupt")
        time.sleep(0.2)


def _setup(data: Path, tmp_path: Path, **extra):
    tree = small_config_dict(data, tmp_path / "runs", rounds=2, **extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, config_from_dict(tree)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_stops_within_seconds_and_resumes(data12, tmp_path, sig, code):
    path, cfg = _setup(data12, tmp_path, train={"iterations": 400, "log_every": 1000})
    run_dir = Path(cfg.run_dir)
    proc = _start(path)
    # round 1 has relabeled (its parts are written) and is training: interrupt it there
    _wait_for(lambda: any((run_dir / "pseudo_labels" / "manifest").glob("part-r001-*")), proc)
    time.sleep(1.0)
    t = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{sig.name} did not stop the run within 60 s")
    stopped_in = time.monotonic() - t
    assert proc.returncode == code, err[-3000:]
    assert "interrupted by " + sig.name in err and "rerun the same command to resume" in err
    assert "*** SIGTERM received" not in err and "logging.cc" not in err  # no native crash dump
    assert "Token authentication is enabled" not in err  # issue 31: Ray's notice is said once, in our words
    assert "dashboard UI off: Ray's API server process still runs" in err
    assert stopped_in < 30, stopped_in
    assert read_lock(Location.of(run_dir)) is None  # released
    state = yaml.safe_load((run_dir / "state.json").read_text())
    assert state["completed"] == [0]
    # the rerun keeps round 1's relabeled cases and only trains
    out = subprocess.run([SEMISAM, "run", str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cases already relabeled, 0 to go" in out.stderr
    assert "wanted SAM actors" not in out.stderr  # issue 18: nothing to relabel is not a short-handed round
    assert "\x1b[" not in out.stdout + out.stderr  # no colour codes when the output is not a terminal
    assert_exactly_once(cfg, [1])


def test_killed_driver_mid_relabel_resumes_exactly_once(data12, tmp_path):
    path, cfg = _setup(data12, tmp_path, workers={"trainer": {"num_cpus": 0.5, "torch_threads": 1},
                                                  "sam": {"num_workers": 1, "num_cpus": 0.5, "torch_threads": 1}})
    run_dir = Path(cfg.run_dir)
    proc = _start(path)
    masks = run_dir / "pseudo_labels" / "masks.zarr" / "round_001"
    _wait_for(lambda: masks.is_dir() and any(p.is_dir() for p in masks.iterdir()), proc)
    proc.kill()  # SIGKILL: no cleanup at all; the lock stays behind with a dead pid
    proc.wait()
    assert read_lock(Location.of(run_dir)) is not None
    out = subprocess.run([SEMISAM, "run", str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "taking over the lock" in out.stderr
    assert_exactly_once(cfg, [1])


# -- issue 31: a signal before the run is under way (imports, preflight, Ray's start-up, placement) -----------
def _tree(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc), the driver's own Ray processes among them."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    mine, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - mine
        mine |= frontier
    return mine


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.mark.parametrize("after_s", [1, 3, 6, 10])
def test_sigint_before_the_run_is_under_way_is_one_line_and_leaves_nothing(data12, tmp_path, after_s):
    path, cfg = _setup(data12, tmp_path, workers={"trainer": {"num_cpus": 0.5, "torch_threads": 1},
                                                  "sam": {"num_workers": 1, "num_cpus": 0.5, "torch_threads": 1}})
    proc = _start(path)
    seen: set[int] = set()
    deadline = time.monotonic() + after_s
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= _tree(proc.pid)  # every process of the run, so that none escapes the check below
        time.sleep(0.05)
    seen |= _tree(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"SIGINT at {after_s} s did not stop the run within 90 s")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "interrupted by SIGINT" in err and "rerun the same command to resume" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.2)
    left = sorted(p for p in seen if _alive(p))
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]
    assert read_lock(Location.of(cfg.run_dir)) is None
