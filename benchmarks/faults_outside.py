"""Issue 16's faults injected from outside into real `semisam run conf/demo.yaml` processes, as the tester did.

    .venv/bin/python -m benchmarks.faults_outside            # ~15 min on 2 cores
    .venv/bin/python -m benchmarks.faults_outside --only trainer_killed_evaluating

Every fault runs the demo config (its synthetic data, written once) with the CLI in a subprocess; the
script watches the run folder and the process tree of that driver (never another Ray cluster's
processes), and sends real signals, flips real bytes, fills a real (tmpfs) disk. A fault passes when it
ends one of the two ways issue 16 allows: the reference run's final test Dice (the run without the fault;
training draws its randomness from (seed, step), so equality is exact) with `semisam verify` OK, or a
non-zero exit whose error is one line that names what is wrong, with no traceback.
Results: ``benchmarks/results/faults_outside.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from benchmarks.common import ROOT, fill_disk, machine_info, setup_logging

log = logging.getLogger("benchmarks.faults_outside")
WORK = ROOT / "runs" / "faults_outside"
RESULT = ROOT / "benchmarks" / "results" / "faults_outside.json"
SEMISAM = Path(sys.executable).parent / "semisam"


def _procs() -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, state, command line)} of every process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                out[int(d.name)] = (int(fields[1]), fields[0],
                                    (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie."""
    state = _procs().get(pid, (0, "X", ""))[1]
    return state not in ("X", "Z")


class Run:
    """One `semisam run conf/demo.yaml` subprocess on the demo data, its run folder and its log."""

    def __init__(self, name: str, *overrides: str, data: Path | None = None, output: Path | None = None):
        data = data or WORK / "data"
        self.dir = (output or WORK / "runs") / name
        self.args = [str(SEMISAM), "run", "conf/demo.yaml", f"name={name}", f"output_dir={self.dir.parent}",
                     f"data.root={data}", f"data.split_file={data / 'splits.json'}", *overrides]
        self.proc: subprocess.Popen | None = None
        self.log = ""

    @property
    def log_path(self) -> Path:
        return WORK / "logs" / f"{self.dir.name}.log"  # off the run's disk: kept when that disk goes

    def start(self) -> Run:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.logfile = open(self.log_path, "a")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self.logfile, stderr=subprocess.STDOUT)
        return self

    def wait(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.logfile.close()
        with open(self.log_path) as f:  # this start's output only (a rerun appends to the same file)
            f.seek(self.log_offset)
            self.log = f.read()
        return rc

    def actors(self, kind: str) -> list[int]:
        """Pids of this driver's actor processes whose name starts with ``ray::{kind}`` (TrainerWorker,
        SamWorker, TrainerWorker.train_round): descendants of this driver only, never another cluster's."""
        procs = _procs()
        mine, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, (ppid, _, _) in procs.items() if ppid in frontier} - mine
            mine |= frontier
        return sorted(pid for pid in mine if procs[pid][2].startswith(f"ray::{kind}") and procs[pid][1] != "Z")

    def busy_in(self, method: str) -> bool:
        """Whether an actor of this driver runs ``method`` (Ray names the process ``ray::Class.method``)."""
        return bool(self.actors(method))

    def final_dice(self) -> float:
        last = max(self.dir.glob("eval/round_*.parquet"))
        return float(pd.read_parquet(last)["dice"].mean())


def _wait_for(cond, timeout: float = 600, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _verify(run_dir: Path) -> tuple[bool, str]:
    out = subprocess.run([str(SEMISAM), "verify", str(run_dir)], capture_output=True, text=True)
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def _error_lines(text: str) -> tuple[list[str], bool]:
    """The errors the CLI reported (``ERROR semisam: ...`` with any continuation lines, e.g. a config error's
    list of keys), and whether a traceback appears anywhere in the output."""
    errors: list[str] = []
    for ln in text.splitlines():
        if " ERROR semisam: " in ln:
            errors.append(ln.split(" ERROR semisam: ", 1)[1])
        elif errors and ln.startswith("  ") and not ln[:4].isdigit():
            errors[-1] += "\n" + ln
    return errors, "Traceback" in text


def _result(run: Run, rc: int, reference: float | None, **extra) -> dict:
    errors, traceback = _error_lines(run.log)
    ok, report = _verify(run.dir) if run.dir.exists() else (False, "no run folder")
    out = {"exit": rc, "error": errors[-1] if errors else "", "traceback": traceback,
           "verify_ok": ok, **extra}
    if rc == 0:
        out["final_dice"] = run.final_dice()
        out["same_as_reference"] = reference is not None and abs(out["final_dice"] - reference) < 1e-6
        out["passed"] = out["same_as_reference"] and ok
    else:
        out["verify"] = report.splitlines()[:4]
        out["passed"] = len(errors) == 1 and not traceback
    return out


# -- the faults ----------------------------------------------------------------------------------------
def trainer_killed_evaluating(ref: float) -> dict:
    """SIGKILL the trainer as soon as each round's checkpoint is published (it then evaluates)."""
    run = Run("trainer_killed_evaluating").start()
    for r in range(3):
        _wait_for(lambda r=r: (run.dir / "checkpoints" / f"ckpt_{r:04d}.pt.sha256").exists(), what=f"ckpt {r}")
        for pid in run.actors("TrainerWorker"):
            os.kill(pid, signal.SIGKILL)
    return _result(run, run.wait(), ref, kills=3)


def trainer_stopped(ref: float) -> dict:
    """SIGSTOP the trainer 1 s into round 1's training (after round 1's pseudo-labels are in), defaults."""
    run = Run("trainer_stopped").start()
    _wait_for(lambda: (run.dir / "eval" / "round_000.parquet").exists(), what="round 0")
    _wait_for(lambda: run.busy_in("TrainerWorker.train_round"), what="round 1 training")
    time.sleep(1.0)
    victim = run.actors("TrainerWorker")[0]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    _wait_for(lambda: not alive(victim), timeout=600, what="trainer replaced")
    replaced_s = time.monotonic() - t0
    return _result(run, run.wait(), ref, replaced_after_s=round(replaced_s, 1))


def sam_stopped(ref: float) -> dict:
    """SIGSTOP one SAM actor for 120 s while it relabels a case in round 1, with the default deadline."""
    run = Run("sam_stopped").start()
    _wait_for(lambda: (run.dir / "eval" / "round_000.parquet").exists(), what="round 0")
    _wait_for(lambda: run.busy_in("SamWorker.relabel"), what="a SAM actor relabeling")
    victim = run.actors("SamWorker.relabel")[0]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    threading.Timer(120, lambda: alive(victim) and os.kill(victim, signal.SIGCONT)).start()
    _wait_for(lambda: not alive(victim) or time.monotonic() - t0 > 125, timeout=200, what="SAM actor replaced")
    replaced_s = time.monotonic() - t0
    res = _result(run, run.wait(), ref, replaced_after_s=round(replaced_s, 1), replaced=replaced_s < 120)
    res["hung_line"] = next((ln.split("pipeline.coordinator: ", 1)[-1] for ln in run.log.splitlines()
                             if "declared hung" in ln), "")
    res["passed"] = res["passed"] and res["replaced"] and bool(res["hung_line"])
    return res


def chunk_bit_flipped(ref: float) -> dict:
    """Flip one bit in a round-1 mask chunk of a finished run; `semisam verify`; rerun; compare bytes."""
    run = Run("chunk_bit_flipped").start()
    rc = run.wait()
    case = sorted(p.name for p in (run.dir / "pseudo_labels" / "masks.zarr" / "round_001").iterdir() if p.is_dir())[0]
    chunk = run.dir / "pseudo_labels" / "masks.zarr" / "round_001" / case / "pseudo_label" / "c" / "0" / "0" / "0"
    original = chunk.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    ok_before, report = _verify(run.dir)
    named = (not ok_before) and case in report
    rc = run.start().wait()
    res = _result(run, rc, ref, verify_named_the_case=named)
    res["restored_bytes"] = chunk.read_bytes() == original
    res["passed"] = res["passed"] and named and res["restored_bytes"]
    return res


def checkpoint_deleted(ref: float) -> dict:
    """Delete ckpt_0001 (and its .sha256) of a finished run, as a corrupt checkpoint's message advises; rerun.
    Round 2's pseudo-labels were made by the old checkpoint 1: they used to be reused ("0 to go")."""
    run = Run("checkpoint_deleted").start()
    run.wait()
    for p in (run.dir / "checkpoints").glob("ckpt_0001.pt*"):
        p.unlink()
    rc = run.start().wait()
    res = _result(run, rc, ref)
    res["rounds_redone_line"] = next((ln.split("pipeline.coordinator: ", 1)[-1] for ln in run.log.splitlines()
                                      if "are redone" in ln), "")
    res["passed"] = res["passed"] and bool(res["rounds_redone_line"])
    return res


def case_arrays_deleted(ref: float) -> dict:
    """Delete one case folder of completed round 1 of a finished run; verify; rerun; verify (two reruns of
    the old code did not redo it though verify said they would)."""
    run = Run("case_arrays_deleted").start()
    run.wait()
    round_dir = run.dir / "pseudo_labels" / "masks.zarr" / "round_001"
    case = sorted(p.name for p in round_dir.iterdir() if p.is_dir())[0]
    shutil.rmtree(round_dir / case)
    ok_before, report = _verify(run.dir)
    rc = run.start().wait()
    res = _result(run, rc, ref, verify_named_the_case=(not ok_before) and case in report)
    res["case_back"] = (round_dir / case / "pseudo_label").is_dir()
    res["passed"] = res["passed"] and res["verify_named_the_case"] and res["case_back"]
    return res


def live_pid_stale_lock(ref: float) -> dict:
    """A lock held by a live process on this host (pid reused) whose heartbeat is a day old."""
    sleeper = subprocess.Popen(["sleep", "600"])
    run = Run("live_pid_stale_lock")
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "driver.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid, "token": "x",
                                                     "started": time.time() - 86400,
                                                     "heartbeat": time.time() - 86400}))
    try:
        return _result(run.start(), run.wait(), ref)
    finally:
        sleeper.kill()


def non_finite(ref: float) -> dict:
    """The pseudo-label term weighted 1e30 with SGD: finite in the config, NaN in round 1."""
    run = Run("non_finite", "train.optimizer=sgd", "train.pseudo_label.weight=1e30").start()
    res = _result(run, run.wait(), None)
    res["checkpoint_0_kept"] = (run.dir / "checkpoints" / "ckpt_0000.pt").exists()
    res["passed"] = res["passed"] and "training stopped at step" in res["error"] and res["checkpoint_0_kept"]
    inf = Run("lr_inf", "train.lr=inf").start()
    rc = inf.wait()
    errors, tb = _error_lines(inf.log)
    res["lr_inf"] = {"exit": rc, "error": errors[-1] if errors else "", "traceback": tb}
    res["passed"] = res["passed"] and rc != 0 and not tb and len(errors) == 1
    return res


def disk_full(ref: float) -> dict:
    """The run folder on a 64 MiB tmpfs, filled up once round 1's relabeling has begun; then freed, rerun."""
    disk = WORK / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)]).returncode:
        return {"skipped": "cannot mount a tmpfs (needs root)", "passed": None}
    try:
        run = Run("disk_full", output=disk / "runs").start()
        _wait_for(lambda: any((run.dir / "pseudo_labels" / "manifest").glob("part-r001-*")), what="round 1")
        filler = fill_disk(disk)
        rc = run.wait()
        first = _result(run, rc, None)
        filler.unlink()
        second = _result(run.start(), run.wait(), ref)
        return {"first": first, "after_freeing": second, "passed": first["passed"] and first["exit"] != 0
                and "disk is full" in first["error"] and second["passed"]}
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def blank_image(ref: float) -> dict:
    """One unlabeled case's image replaced by zeros (same header)."""
    data = WORK / "data_blank"
    if not data.exists():
        shutil.copytree(WORK / "data", data)
    split = json.loads((data / "splits.json").read_text())
    case = split["train_order"][-1]  # num_labeled = 2 takes the first ones: the last is unlabeled
    path = next((data / "imagesTr").glob(f"{case}*.nii.gz"))
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine, img.header), path)
    run = Run("blank_image", data=data).start()
    rc = run.wait()
    warned = any("the image is constant" in ln and case in ln for ln in run.log.splitlines())
    m = pd.concat(pd.read_parquet(p) for p in (run.dir / "pseudo_labels" / "manifest").glob("*.parquet"))
    prompts = int(m.loc[m["case_id"] == case, "num_prompts"].sum())
    return {"exit": rc, "case": case, "warned": warned, "prompts_on_the_blank_case": prompts,
            "passed": rc == 0 and warned and prompts == 0}


# -- issue 31: faults outside the list ------------------------------------------------------------------------
SAM = ("generalist.backend=sam", f"generalist.cache_dir={WORK / 'cache'}",
       f"generalist.sam.checkpoint={WORK / 'data' / 'tiny_sam.pt'}")


def _descendants(pid: int) -> set[int]:
    procs = _procs()
    mine, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in procs.items() if ppid in frontier} - mine
        mine |= frontier
    return mine


def sigint_early(ref: float) -> dict:
    """SIGINT (as from a terminal, default disposition) 1, 3, 6, 10, 20 and 35 s after `semisam run` starts:
    each must exit 130 with one line and no traceback, and leave no process of the run 10 s later; then a
    rerun of the last one resumes to the reference result."""
    tries = {}
    for after in (1, 3, 6, 10, 20, 35):
        run = Run("sigint_early").start()
        seen, t0 = set(), time.monotonic()
        while time.monotonic() - t0 < after and run.proc.poll() is None:
            seen |= _descendants(run.proc.pid)
            time.sleep(0.05)
        run.proc.send_signal(signal.SIGINT)
        rc = run.wait(timeout=120)
        time.sleep(10)
        left = sorted(pid for pid in seen if alive(pid))
        errors, traceback = _error_lines(run.log)
        said = [ln for ln in run.log.splitlines() if "interrupted by SIGINT" in ln]
        tries[f"{after}s"] = {"exit": rc, "traceback": traceback, "left_after_10s": len(left),
                              "line": said[-1].split(": ", 1)[-1][:160] if said else "",
                              "passed": rc == 130 and not traceback and not left and len(said) == 1}
        log.info("SIGINT at %d s: %s", after, tries[f"{after}s"])
    res = _result(run.start(), run.wait(), ref)
    return {"tries": tries, "rerun": res, "passed": all(t["passed"] for t in tries.values()) and res["passed"]}


def cache_chunk_truncated(ref: float) -> dict:
    """`truncate -s 2048` one chunk of the shared embedding cache (generalist.backend=sam) after a run that
    filled it; a second run on the same cache must warn naming the file and end with the first run's Dice."""
    shutil.rmtree(WORK / "cache", ignore_errors=True)
    first = Run("cache_fill", *SAM).start()
    rc1 = first.wait()
    chunk = next(p for p in sorted((WORK / "cache").rglob("c/*/0/0/0")) if p.stat().st_size > 2048)
    os.truncate(chunk, 2048)
    second = Run("cache_chunk_truncated", *SAM).start()
    res = _result(second, second.wait(), first.final_dice() if rc1 == 0 else None)
    res["named"] = sum(str(chunk.parent.parent.parent.parent.parent) in ln for ln in second.log.splitlines()
                       if "embedding cache" in ln)
    res["passed"] = res["passed"] and res["named"] == 1
    return res


def manifest_part_deleted(ref: float) -> dict:
    """`rm pseudo_labels/manifest/part-r001-*` of a finished run, rerun: round 1's cases are relabeled."""
    run = Run("manifest_part_deleted").start()
    run.wait()
    for part in (run.dir / "pseudo_labels" / "manifest").glob("part-r001-*"):
        part.unlink()
    ok_before, _ = _verify(run.dir)
    res = _result(run.start(), run.wait(), ref, verify_ok_before_rerun=ok_before)
    res["repair_line"] = next((ln.split(": ", 1)[-1] for ln in run.log.splitlines() if "no manifest rows" in ln), "")
    res["passed"] = res["passed"] and not ok_before and bool(res["repair_line"])
    return res


def config_yaml_broken(ref: float) -> dict:
    """The run folder's config.yaml cut in half (not YAML any more) after a finished run; rerun."""
    run = Run("config_yaml_broken").start()
    run.wait()
    cfg = run.dir / "config.yaml"
    cfg.write_text(cfg.read_text()[: len(cfg.read_text()) // 2] + "\n  - [unclosed: {\n")
    res = _result(run.start(), run.wait(), ref)
    res["passed"] = res["passed"] and "config.yaml is damaged" in res["error"]
    return res


def preset_labels_replaced(ref: float) -> dict:
    """A config with base: conf/acdc.yaml and data.labels {0: background, 1: LA}: `semisam config --resolved`."""
    preset = WORK / "la.yaml"
    preset.write_text(f"base: {ROOT / 'conf' / 'acdc.yaml'}\ndata:\n  labels: {{0: background, 1: LA}}\n")
    out = subprocess.run([str(SEMISAM), "config", "--resolved", str(preset)], capture_output=True, text=True)
    import yaml

    labels = yaml.safe_load(out.stdout)["data"]["labels"] if out.returncode == 0 else None
    base_line = next((ln.split(": ", 1)[-1][:120] for ln in out.stderr.splitlines() if "from its base" in ln), "")
    return {"exit": out.returncode, "labels": labels, "base_line": base_line,
            "passed": labels == {"0": "background", "1": "LA"} and bool(base_line)}


def selection_in_unlabeled(ref: float) -> dict:
    """data.selection naming a training case after the labeled ones, with class_source auto."""
    split = json.loads((WORK / "data" / "splits.json").read_text())
    case = split["train_order"][-1]
    run = Run("selection_in_unlabeled", "generalist.class_source=auto", f"data.selection=[{case}]").start()
    rc = run.wait()
    line = next((ln.split(": ", 1)[-1] for ln in run.log.splitlines() if "held out of the unlabeled pool" in ln), "")
    m = pd.concat(pd.read_parquet(p) for p in (run.dir / "pseudo_labels" / "manifest").glob("*.parquet"))
    return {"exit": rc, "split_line": line, "selection_case_relabeled": bool((m["case_id"] == case).any()),
            "passed": rc == 0 and bool(line) and not (m["case_id"] == case).any()}


def empty_label(ref: float) -> dict:
    """One labeled case's label all zeros (same header): validate and run must say so."""
    data = WORK / "data_empty_label"
    if not data.exists():
        shutil.copytree(WORK / "data", data)
    case = json.loads((data / "splits.json").read_text())["train_order"][0]  # labeled
    path = next((data / "labelsTr").glob(f"{case}*.nii.gz"))
    lab = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine, lab.header), path)
    val = subprocess.run([str(SEMISAM), "validate", str(data)], capture_output=True, text=True)
    run = Run("empty_label", data=data).start()
    rc = run.wait()
    said = lambda text: any("empty label" in ln and case in ln for ln in text.splitlines())  # noqa: E731
    return {"exit": rc, "validate_warned": said(val.stderr), "run_warned": said(run.log),
            "passed": rc == 0 and said(val.stderr) and said(run.log)}


def stray_round_folder(ref: float) -> dict:
    """A stray `masks.zarr/round_099` folder in a finished run: `semisam verify`."""
    run = Run("stray_round_folder").start()
    run.wait()
    (run.dir / "pseudo_labels" / "masks.zarr" / "round_099" / "x").mkdir(parents=True, exist_ok=True)
    out = subprocess.run([str(SEMISAM), "verify", str(run.dir)], capture_output=True, text=True)
    note = next((ln.strip() for ln in out.stdout.splitlines() if "round_099" in ln), "")
    return {"exit": out.returncode, "note": note, "zarr_warning": "ZarrUserWarning" in out.stderr,
            "passed": out.returncode == 0 and bool(note) and "ZarrUserWarning" not in out.stderr}


def ray_notices(ref: float) -> dict:
    """The reference run's log: no Ray token-auth notice; the start-up line says what runs of the dashboard."""
    text = (WORK / "logs" / "reference.log").read_text()
    return {"token_notice": "Token authentication is enabled" in text,
            "says_api_server": "Ray's API server process still runs" in text,
            "passed": "Token authentication is enabled" not in text and "Ray's API server process still runs" in text}


FAULTS = {f.__name__: f for f in (trainer_killed_evaluating, trainer_stopped, sam_stopped, chunk_bit_flipped,
                                  checkpoint_deleted, case_arrays_deleted, live_pid_stale_lock, non_finite,
                                  disk_full, blank_image, sigint_early, cache_chunk_truncated,
                                  manifest_part_deleted, config_yaml_broken, preset_labels_replaced,
                                  selection_in_unlabeled, empty_label, stray_round_folder, ray_notices)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=sorted(FAULTS), default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    setup_logging(args.verbose, log)
    WORK.mkdir(parents=True, exist_ok=True)
    for stale in [*(WORK / "runs").glob("*"), *(WORK / "logs").glob("*")]:
        if args.only is None or any(stale.name.startswith(name) for name in [*args.only, "reference"]):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if not (WORK / "data" / "splits.json").exists():
        subprocess.run([str(SEMISAM), "demo-data", str(WORK / "data")], check=True, cwd=ROOT)
    t = time.perf_counter()
    reference = Run("reference").start()
    assert reference.wait() == 0, reference.log[-3000:]
    ref = reference.final_dice()
    log.info("reference: final test Dice %.4f (%.0f s)", ref, time.perf_counter() - t)
    rows = {}
    for name in args.only or list(FAULTS):
        t = time.perf_counter()
        try:
            rows[name] = FAULTS[name](ref)
        except Exception as e:  # noqa: BLE001 - a fault that hangs or breaks the harness is a result too
            rows[name] = {"harness_error": f"{type(e).__name__}: {e}", "passed": False}
        rows[name]["seconds"] = round(time.perf_counter() - t, 1)
        log.info("%s: %s", name, json.dumps(rows[name])[:600])
    old = json.loads(RESULT.read_text())["faults"] if args.only and RESULT.exists() else {}
    RESULT.write_text(json.dumps({
        "command": "python -m benchmarks.faults_outside" + (" --only " + " ".join(args.only) if args.only else ""),
        "date": dt.date.today().isoformat(), "machine": machine_info(), "reference_final_dice": ref,
        "faults": {**old, **rows}}, indent=1))
    for name, row in rows.items():
        print(f"{name:<28} {'passed' if row.get('passed') else 'FAILED' if row.get('passed') is False else 'skipped'}")


if __name__ == "__main__":
    main()
