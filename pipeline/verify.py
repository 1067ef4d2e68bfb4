"""``semisam verify RUN_DIR``: check a run folder and list every problem (nothing is changed).

Checks: the saved config and state.json read; every completed round's checkpoint exists, its bytes
match the SHA-256 recorded in state.json and in its ``.sha256``, and it loads weights-only (a pickled
object inside is a problem, whatever its checksum); every manifest part reads; no (round, case) has rows
in two parts; every case with manifest rows has its arrays, and **every chunk of them is read** (a
flipped bit fails its CRC-32C; the masks are small, uint8, so this stays quick: the embedding cache,
which is large, is not read); every unlabeled case of a completed relabel round is there (when the
dataset is reachable); the provenance chain: each round's pseudo-labels were made by the checkpoint
before it and each test and validation table by its round's checkpoint, as state.json records them;
eval/audit tables read; who holds the lock. A local path or any fsspec URL; a missing folder or bucket is named as such.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd
import yaml

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import SemisamError
from pipeline.generalist.adapt import decoder_sha
from pipeline.oracle import banner as oracle_banner
from pipeline.run_folder import RunFolder
from pipeline.run_lock import read_lock
from pipeline.storage import Location, file_sha256, read_table
from pipeline.store import PseudoLabelStore, read_part, round_key


@dataclass
class VerifyReport:
    run_dir: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    oracle: str | None = None
    """:data:`pipeline.oracle.BANNER` when the folder holds an oracle run (printed first)."""

    def text(self) -> str:
        lines = [self.oracle] if self.oracle else []
        lines += [f"{self.run_dir}: " + ("OK" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_run(run_dir: str | os.PathLike | Location) -> VerifyReport:
    folder = RunFolder(run_dir)
    loc = folder.root
    rep = VerifyReport(loc.url)
    try:
        missing = _missing_folder(loc)
        if missing is None and not folder.is_run():
            missing = f"{folder.config_loc} is missing: not a semisam run folder"
    except SemisamError as e:
        missing = str(e)
    if missing:
        rep.problems.append(missing)
        return rep
    rep.oracle = oracle_banner(folder)
    cfg = None
    try:
        cfg = folder.load_config()
    except (SemisamError, yaml.YAMLError) as e:
        rep.problems.append(f"{RunFolder.CONFIG}: {e}")
    state = _state(folder, rep)
    completed = sorted(state.get("completed", []))
    rep.notes.append(f"completed rounds: {completed or 'none'}")
    checkpoints = state.get("checkpoints", {})
    _check_checkpoints(folder, completed, checkpoints, rep)
    _check_adapted_decoder(folder, state, rep)
    _check_store(folder, cfg, completed, checkpoints, rep, decoder_sha(state))
    _check_tables(folder, completed, checkpoints, rep)
    lock = read_lock(loc)
    if lock:
        rep.notes.append(f"locked by host {lock.get('host')} pid {lock.get('pid')} (a running driver, or a "
                         "dead one whose lock the next run takes over)")
    return rep


def _state(folder: RunFolder, rep: VerifyReport) -> dict:
    if not folder.state_loc.exists():
        rep.notes.append(f"no {RunFolder.STATE}: no round has completed")
        return {}
    try:
        return folder.read_state()
    except SemisamError as e:
        rep.problems.append(str(e))
        return {}


def _check_tables(folder: RunFolder, completed: list[int], checkpoints: dict, rep: VerifyReport) -> None:
    """Every eval (test and validation) and audit table reads; a completed round's test and validation
    tables were made by its own checkpoint."""
    tables = [("eval", loc) for loc in [*folder.tables("eval"), *folder.val_tables()]]
    tables += [("audit", loc) for loc in folder.tables("audit")]
    for kind, loc in tables:
        try:
            table = read_table(loc)
        except SemisamError as e:
            rep.problems.append(str(e))
            continue
        r = int(loc.name.removeprefix("val_").split("_")[1].split(".")[0])
        made = set(table["checkpoint_sha256"].dropna()) if "checkpoint_sha256" in table else set()
        if kind == "eval" and r in completed and made and made != {checkpoints.get(str(r))}:
            rep.problems.append(f"{loc} was computed with another checkpoint than checkpoint {r} "
                                f"({RunFolder.STATE}); a rerun of `semisam run` redoes rounds {r}..")


def _check_checkpoints(folder: RunFolder, completed: list[int], recorded: dict, rep: VerifyReport) -> None:
    for r in completed:
        ckpt = folder.checkpoint(r)
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


def _manifest_with_parts(store, rep: VerifyReport) -> pd.DataFrame:
    """Every readable manifest part, its rows tagged with the part's name (``_part``); unreadable parts and
    (round, case) pairs with rows in two parts are problems."""
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
    return m


def _expected_unlabeled(cfg, rep: VerifyReport) -> set[str] | None:
    """The run's unlabeled cases when its dataset is reachable, else None (noted)."""
    if cfg is None:
        return None
    try:
        from pipeline.data.dataset import read_data
        from pipeline.data.splits import resolve_split

        return set(resolve_split(cfg.data, read_data(cfg.data)).unlabeled)
    except SemisamError as e:
        rep.notes.append(f"dataset not checked ({str(e).splitlines()[0]})")
        return None


def _check_adapted_decoder(folder: RunFolder, state: dict, rep: VerifyReport) -> None:
    """The adapted decoder state.json records (``generalist.adapt``) is there with its SHA-256."""
    sha = decoder_sha(state)
    if not sha:
        return
    loc = folder.adapted_decoder
    if not loc.is_file():
        rep.problems.append(f"{loc} is missing (state.json records adapted decoder {sha[:12]}...); a rerun fits "
                            "it again and redoes the rounds made with it")
    elif file_sha256(loc) != sha:
        rep.problems.append(f"{loc} has other bytes than the adapted decoder {sha[:12]}... state.json records; a "
                            "rerun fits it again and redoes the rounds made with it")
    else:
        rep.notes.append(f"adapted decoder {sha[:12]}... (generalist.adapt)")


def _check_store(folder: RunFolder, cfg, completed: list[int], checkpoints: dict, rep: VerifyReport,
                 decoder: str = "") -> None:
    if not (folder.pseudo_labels / "masks.zarr" / "zarr.json").exists():
        rep.notes.append("no pseudo-label store")
        return
    try:
        store = PseudoLabelStore(folder.pseudo_labels)
    except SemisamError as e:
        rep.problems.append(str(e))
        return
    stray = store.stray_folders()
    if stray:
        rep.notes.append(f"{len(stray)} folders under {store.masks_loc} are not part of the store (never read; "
                         f"safe to delete): {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}")
    m = _manifest_with_parts(store, rep)
    expected = _expected_unlabeled(cfg, rep)
    if "decoder_sha256" in m:
        dec = m["decoder_sha256"].fillna("").astype(str)
        for r, c in sorted(set(zip(m.loc[(dec != "") & (dec != decoder), "round"],
                                   m.loc[(dec != "") & (dec != decoder), "case_id"], strict=True))):
            rep.problems.append(f"round {r} case {c} was made by another adapted decoder than the one "
                                f"{RunFolder.STATE} records; a rerun of `semisam run` relabels it")
    for r in store.rounds():
        _check_store_round(store, r, m.loc[m["round"] == r], r in completed, checkpoints.get(str(r - 1)),
                           expected, rep)


def _check_store_round(store, r: int, rows: pd.DataFrame, completed: bool, want: str | None,
                       expected: set[str] | None, rep: VerifyReport) -> None:
    """Round ``r`` of the store against its manifest ``rows``: arrays present and whole, made by checkpoint
    ``r - 1`` (SHA-256 ``want``), and, for a completed round, every ``expected`` unlabeled case there."""
    status = store.case_status(r)
    in_manifest = set(rows["case_id"])
    for c in sorted(in_manifest):
        if not status.get(c, False):
            rep.problems.append(f"round {r} case {c} is in the manifest but its arrays are missing; "
                                "a rerun of `semisam run` redoes it")
    for c, why in store.damaged_cases(r, sorted(c for c in in_manifest if status.get(c, False))).items():
        rep.problems.append(f"round {r} case {c} is damaged ({why}, under "
                            f"{store.masks_loc / round_key(r) / c}); a rerun of `semisam run` relabels it")
    if want:
        sha = rows["checkpoint_sha256"].astype(str)
        stale = sorted(set(rows.loc[(sha != "") & (sha != want), "case_id"]))
        if stale:
            rep.problems.append(f"round {r}: {len(stale)} cases were made by another checkpoint {r - 1} than the "
                                f"one {RunFolder.STATE} records ({', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}); "
                                "a rerun of `semisam run` relabels them" + (f" and redoes rounds {r}.." if completed else ""))
    extra = sorted(set(status) - in_manifest)
    if extra:
        rep.notes.append(f"round {r}: {len(extra)} cases have arrays but no manifest rows (unfinished; a "
                         "rerun redoes them)")
    if expected is not None and completed:
        lost = sorted(expected - in_manifest)
        if lost:
            rep.problems.append(f"round {r} is completed but {len(lost)} unlabeled cases have no pseudo-labels "
                                f"(given up or lost): {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
    rep.notes.append(f"round {r}: {len(in_manifest)} cases in the manifest")
