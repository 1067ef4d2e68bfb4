"""``semisam verify RUN_DIR``: check a run folder and list every problem (nothing is changed).

Checks: the saved config and state.json read; every completed round's checkpoint exists, its bytes
match the SHA-256 recorded in state.json and in its ``.sha256``, and it loads weights-only (a pickled
object inside is a problem, whatever its checksum); every manifest part reads; no (round, case) has rows
in two parts; every case with manifest rows has its arrays, and **every chunk of them is read** (a
flipped bit fails its CRC-32C; the masks are small, uint8, so this stays quick: the embedding cache,
which is large, is not read); every unlabeled case of a completed relabel round is there (when the
dataset is reachable); the provenance chain: each round's pseudo-labels were made by the checkpoint
before it and each test table by its round's checkpoint, as state.json records them; eval/audit tables
read; who holds the lock. A local path or any fsspec URL; a missing folder or bucket is named as such.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pandas as pd
import yaml

from pipeline.checkpoint import checkpoint_path, load_checkpoint
from pipeline.errors import SemisamError
from pipeline.run_lock import read_lock
from pipeline.storage import Location, read_table


@dataclass
class VerifyReport:
    run_dir: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"{self.run_dir}: " + ("OK" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_run(run_dir: str | os.PathLike | Location) -> VerifyReport:
    loc = Location.of(run_dir)
    rep = VerifyReport(loc.url)
    try:
        missing = _missing_folder(loc)
        if missing is None and not (loc / "config.yaml").exists():
            missing = f"{loc / 'config.yaml'} is missing: not a semisam run folder"
    except SemisamError as e:
        missing = str(e)
    if missing:
        rep.problems.append(missing)
        return rep
    cfg = None
    try:
        from pipeline.config import config_from_dict

        cfg = config_from_dict(yaml.safe_load((loc / "config.yaml").read_text()), source=str(loc / "config.yaml"))
    except (SemisamError, yaml.YAMLError) as e:
        rep.problems.append(f"config.yaml: {e}")
    state = _state(loc, rep)
    completed = sorted(state.get("completed", []))
    rep.notes.append(f"completed rounds: {completed or 'none'}")
    checkpoints = state.get("checkpoints", {})
    _check_checkpoints(loc, completed, checkpoints, rep)
    _check_store(loc, cfg, completed, checkpoints, rep)
    for sub in ("eval", "audit"):
        for name in (loc / sub).list_names():
            if name.endswith(".parquet"):
                try:
                    table = read_table(loc / sub / name)
                except SemisamError as e:
                    rep.problems.append(str(e))
                    continue
                r = int(name.split("_")[1].split(".")[0]) if name.startswith("round_") else None
                made = set(table["checkpoint_sha256"].dropna()) if "checkpoint_sha256" in table else set()
                if sub == "eval" and r in completed and made and made != {checkpoints.get(str(r))}:
                    rep.problems.append(f"{loc / sub / name} was computed with another checkpoint than checkpoint "
                                        f"{r} (state.json); a rerun of `semisam run` redoes rounds {r}..")
    lock = read_lock(loc)
    if lock:
        rep.notes.append(f"locked by host {lock.get('host')} pid {lock.get('pid')} (a running driver, or a "
                         "dead one whose lock the next run takes over)")
    return rep


def _state(loc: Location, rep: VerifyReport) -> dict:
    s = loc / "state.json"
    if not s.exists():
        rep.notes.append("no state.json: no round has completed")
        return {}
    try:
        return json.loads(s.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        rep.problems.append(f"{s} is damaged ({e})")
        return {}


def _check_checkpoints(loc: Location, completed: list[int], recorded: dict, rep: VerifyReport) -> None:
    for r in completed:
        ckpt = checkpoint_path(loc, r)
        if not ckpt.is_file():
            rep.problems.append(f"{ckpt} is missing (round {r} is completed); a rerun redoes rounds {r}..")
            continue
        try:  # one read: the bytes against state.json and the .sha256, then loaded weights-only (a matching
            # checksum says the bytes are those published, not that they are safe to load)
            load_checkpoint(ckpt, expect_sha256=recorded.get(str(r)))
        except SemisamError as e:
            rep.problems.append(str(e))


def _missing_folder(loc: Location) -> str | None:
    """Why the run folder is not there at all (a folder, or a bucket on object storage), or None."""
    if loc.exists():
        return None
    if not loc.is_local:
        bucket = loc.path.split("/", 1)[0]
        if not loc.fs.exists(bucket):
            return f"the bucket {loc.protocol}://{bucket} does not exist (or these credentials cannot see it)"
    return f"{loc.url} does not exist"


def _check_store(loc: Location, cfg, completed: list[int], checkpoints: dict, rep: VerifyReport) -> None:
    from pipeline.store import PseudoLabelStore, read_part

    store_loc = loc / "pseudo_labels"
    if not (store_loc / "masks.zarr" / "zarr.json").exists():
        rep.notes.append("no pseudo-label store")
        return
    try:
        store = PseudoLabelStore(store_loc)
    except SemisamError as e:
        rep.problems.append(str(e))
        return
    frames = []
    for part in store.parts():
        try:
            df = read_part(part)
        except SemisamError as e:
            rep.problems.append(str(e))
            continue
        df["_part"] = part.name
        frames.append(df)
    m = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["round", "case_id", "slice", "_part"])
    m["checkpoint_sha256"] = m["checkpoint_sha256"].fillna("") if "checkpoint_sha256" in m else ""  # older parts
    twice = m.groupby(["round", "case_id"])["_part"].nunique()
    for (r, c), n in twice[twice > 1].items():
        rep.problems.append(f"round {r} case {c} has rows in {n} manifest parts (counted twice)")
    expected = None
    if cfg is not None:
        try:
            from pipeline.data.dataset import read_data
            from pipeline.data.splits import resolve_split

            expected = set(resolve_split(cfg.data, read_data(cfg.data)).unlabeled)
        except SemisamError as e:
            rep.notes.append(f"dataset not checked ({str(e).splitlines()[0]})")
    for r in store.rounds():
        status = store.case_status(r)
        rows = m.loc[m["round"] == r]
        in_manifest = set(rows["case_id"])
        for c in sorted(in_manifest):
            if not status.get(c, False):
                rep.problems.append(f"round {r} case {c} is in the manifest but its arrays are missing; "
                                    "a rerun of `semisam run` redoes it")
        for c, why in store.damaged_cases(r, sorted(c for c in in_manifest if status.get(c, False))).items():
            rep.problems.append(f"round {r} case {c} is damaged ({why}, under "
                                f"{store.masks_loc / f'round_{r:03d}' / c}); a rerun of `semisam run` relabels it")
        want = checkpoints.get(str(r - 1))
        if want:
            sha = rows["checkpoint_sha256"].astype(str)
            stale = sorted(set(rows.loc[(sha != "") & (sha != want), "case_id"]))
            if stale:
                rep.problems.append(f"round {r}: {len(stale)} cases were made by another checkpoint {r - 1} than the "
                                    f"one state.json records ({', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}); "
                                    "a rerun of `semisam run` relabels them"
                                    + (f" and redoes rounds {r}.." if r in completed else ""))
        extra = sorted(set(status) - in_manifest)
        if extra:
            rep.notes.append(f"round {r}: {len(extra)} cases have arrays but no manifest rows (unfinished; a "
                             "rerun redoes them)")
        if expected is not None and r in completed:
            lost = sorted(expected - in_manifest)
            if lost:
                rep.problems.append(f"round {r} is completed but {len(lost)} unlabeled cases have no pseudo-labels "
                                    f"(given up or lost): {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
        rep.notes.append(f"round {r}: {len(in_manifest)} cases in the manifest")
