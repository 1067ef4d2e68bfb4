"""What a run folder already holds, and what of it still stands: reopening, the provenance chain, repairs,
and the warm start from another run's round 0.

Provenance: eval tables, pseudo-label cases and manifest rows record the SHA-256 of the checkpoint they
came from, and state.json records each published checkpoint's. A resume checks that chain
(:func:`check_chain`) and redoes what no longer matches its source.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from pipeline.checkpoint import checksum_path, load_checkpoint
from pipeline.config import RunConfig, config_differences
from pipeline.errors import ConfigError, StoreError
from pipeline.generalist.adapt import decoder_sha
from pipeline.round_summary import RoundSummary
from pipeline.run_folder import RunFolder
from pipeline.storage import Location, read_table, sha256_hex
from pipeline.store import PseudoLabelStore

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = ("rounds", "workers", "device")
"""Keys a resumed run may change: where it runs (workers, device) and how many rounds. The schedule those
rounds follow is ``train.schedule_rounds``, fixed when the run folder is created, so more rounds change
no earlier one (see :func:`prepare_run_dir`)."""

NOT_RESUMABLE_WORKER_KEYS = ("workers.overlap",)
"""Keys under ``workers`` that change what is computed, so a resume may not change them."""

WARM_START_FREE = ("train.pseudo_label", "train.init_from", "train.progress_seconds", "train.log_every")
"""Keys in which a run may differ from the run whose round 0 it takes (``train.init_from``): round 0 does
not use them. ``train.schedule_rounds`` is free too, except for UA-MT (its round 0 follows the run-long
threshold schedule)."""


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """Create or reopen the run folder; returns the config to run with (``train.schedule_rounds`` fixed: the
    saved run's, else ``rounds``) and the saved state (:meth:`RunFolder.read_state`). A folder holding a run
    with another config is refused, naming the keys that differ (:data:`RESUMABLE_CHANGES` may)."""
    folder = RunFolder(cfg.run_dir)
    saved = folder.saved_config() if folder.is_run() else None
    schedule = cfg.train.schedule_rounds or (saved["train"]["schedule_rounds"] if saved else cfg.rounds)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"schedule_rounds": schedule})})
    if saved is not None:
        new = cfg.model_dump(mode="json")
        changed = config_differences(saved, new, ignored=RESUMABLE_CHANGES)
        changed += config_differences(saved, new, compared=NOT_RESUMABLE_WORKER_KEYS)
        if changed:
            raise ConfigError(
                f"run folder {folder} holds a run with another config (differs in: {', '.join(changed)}); "
                "resume it with the same config, or pick a new name= / output_dir=")
    folder.write_config(cfg)
    return cfg, folder.read_state()


def forget_checkpoints_from(state: dict, r: int) -> None:
    """Drop the recorded SHA-256s (and training statistics) of checkpoints ``r``.. (they are redone)."""
    for key in ("checkpoints", "train_stats"):
        for v in [k for k in state.get(key, {}) if int(k) >= r]:
            del state[key][v]


def newest_published(state: dict) -> tuple[int, str] | None:
    """(version, SHA-256) of the newest checkpoint state.json records, or None."""
    if not state["checkpoints"]:
        return None
    newest = max(int(v) for v in state["checkpoints"])
    return newest, state["checkpoints"][str(newest)]


def broken_link(folder: RunFolder, state: dict, store: PseudoLabelStore | None, r: int) -> str | None:
    """Why completed round ``r`` cannot stand, or None. Its links: checkpoint r exists with a SHA-256 in
    state.json; its test table, if any, was computed with that checkpoint; its pseudo-labels (``store``,
    None for a run that does not relabel) were made by checkpoint r - 1 as state.json records it."""
    if not folder.checkpoint(r).is_file():
        return f"checkpoint {r} is missing"
    sha = state["checkpoints"].get(str(r))
    if not sha:
        return f"checkpoint {r} has no SHA-256 in {RunFolder.STATE}"
    eval_loc = folder.table("eval", r)
    if eval_loc.exists():
        try:
            table = read_table(eval_loc)
        except StoreError as e:  # a damaged table is redone with its round, never read
            return f"its test table cannot be read ({str(e).split(' cannot be read ', 1)[-1].split(';')[0]})"
        if "checkpoint_sha256" in table and set(table["checkpoint_sha256"].dropna()) - {sha}:
            return f"its test table {eval_loc.name} was computed with another checkpoint than checkpoint {r}"
    if r > 0 and store is not None:
        want = state["checkpoints"].get(str(r - 1))
        manifest = store.manifest(r)
        made_by = set(manifest["checkpoint_sha256"]) - {""}
        if want and made_by - {want}:
            return f"its pseudo-labels were made by another checkpoint {r - 1} than {RunFolder.STATE} records"
        if set(manifest["decoder_sha256"]) - {"", decoder_sha(state)}:
            return f"its pseudo-labels were made by another adapted decoder than {RunFolder.STATE} records"
    return None


def check_chain(folder: RunFolder, state: dict, store: PseudoLabelStore | None) -> list[int]:
    """The completed rounds whose provenance holds (:func:`broken_link`); from the first broken link on,
    rounds are redone (``state`` is changed and saved). A checkpoint published by the unfinished round
    after the last completed one is kept when its file is there: that round then evaluates it instead of
    training again."""
    completed = sorted(state["completed"])
    for r in completed:
        why = broken_link(folder, state, store, r)
        if why:
            log.warning("round %d of %s: %s; rounds %d.. are redone", r, folder, why, r)
            state["completed"] = [c for c in completed if c < r]
            state["summaries"] = [s for s in state["summaries"] if s["round"] < r]
            forget_checkpoints_from(state, r)
            folder.save_state(state)
            return state["completed"]
    nxt = completed[-1] + 1 if completed else 0
    if not folder.checkpoint(nxt).is_file():
        forget_checkpoints_from(state, nxt)
    forget_checkpoints_from(state, nxt + 1)
    return completed


def invalid_cases(store: PseudoLabelStore, state: dict, r: int) -> set[str]:
    """Cases with manifest rows in round ``r`` that must not be used, their rows removed so that they are
    redone: arrays missing, a chunk that fails its checksum (every chunk of the round is read), or made by
    another checkpoint than the ``r - 1`` that state.json records (it was retrained since)."""
    m = store.manifest(r)
    done = set(m["case_id"])
    if not done:
        return set()
    want = state["checkpoints"].get(str(r - 1), "")
    sha = m["checkpoint_sha256"].astype(str)
    other = m[(sha != "") & (sha != want)] if want else m.iloc[:0]
    bad = {c: f"made by checkpoint {r - 1} with SHA-256 {s[:12]}..., now {want[:12]}..."
           for c, s in zip(other["case_id"], other["checkpoint_sha256"], strict=True)}
    dec = m["decoder_sha256"].astype(str)
    stale = m[(dec != "") & (dec != decoder_sha(state))]
    bad.update({c: f"made by another adapted decoder ({s[:12]}...)"
                for c, s in zip(stale["case_id"], stale["decoder_sha256"], strict=True)})
    present = store.case_status(r)
    bad.update({c: "arrays missing" for c in done - set(bad) if not present.get(c, False)})
    bad.update(store.damaged_cases(r, sorted(done - set(bad))))
    if bad:
        shown = "; ".join(f"{c}: {why}" for c, why in sorted(bad.items())[:5])
        log.warning("round %d: %d cases in the manifest cannot be used and are redone (%s%s)", r, len(bad),
                    shown, " ..." if len(bad) > 5 else "")
        store.remove_cases(r, set(bad))
    return set(bad)


def given_up(state: dict, r: int) -> set[str]:
    """Cases round ``r`` gave up on (its summary's ``failed_cases``): they stay given up on a resume."""
    for summary in state.get("summaries", []):
        if summary.get("round") == r:
            return set((summary.get("relabel") or {}).get("failed_cases") or {})
    return set()


def lost_cases(store: PseudoLabelStore, state: dict, r: int, unlabeled: list[str]) -> set[str]:
    """Unlabeled cases of completed relabel round ``r`` that have no manifest rows and were not given up
    (rows against arrays, as ``semisam verify`` checks them: a deleted manifest part loses its cases' rows
    while their arrays stay). Their arrays, if any, are replaced when they are relabeled."""
    lost = set(unlabeled) - set(store.manifest(r)["case_id"]) - given_up(state, r)
    if lost:
        shown = ", ".join(sorted(lost)[:5])
        log.warning("round %d is completed but %d unlabeled cases have no manifest rows (%s%s): they are "
                    "relabeled with checkpoint %d", r, len(lost), shown, " ..." if len(lost) > 5 else "", r - 1)
    return lost


def _check_warm_source(cfg: RunConfig, src_run: RunFolder, where: str) -> None:
    """The run whose round 0 is taken must have trained it on the same data, split, model, seed and
    training settings (:data:`WARM_START_FREE` aside)."""
    if not src_run.is_run():
        raise ConfigError(f"{where}: {src_run} is not a run folder (no {RunFolder.CONFIG})")
    free = list(WARM_START_FREE)
    if cfg.train.method != "uamt":  # only UA-MT's round 0 follows the run-long schedule
        free.append("train.schedule_rounds")
    diffs = config_differences(src_run.saved_config(), cfg.model_dump(mode="json"),
                               compared=("data", "model", "seed", "train"), ignored=tuple(free))
    if diffs:
        raise ConfigError(f"{where}: its round 0 was trained with other settings (differs in: "
                          f"{', '.join(sorted(diffs))}); a warm start needs the same data, split, model, seed "
                          "and training settings")


def warm_start(cfg: RunConfig, state: dict) -> None:
    """Take round 0 from ``train.init_from`` (see the config docstring): its checkpoint (verified), eval
    table and round-0 summary become this run's, recorded in ``state`` (saved)."""
    src = Location.of(cfg.train.init_from, cfg.storage_options)
    src_run = RunFolder(src.parent.parent if src.name.endswith(".pt") else src)
    ckpt = src if src.name.endswith(".pt") else src_run.checkpoint(0)
    _check_warm_source(cfg, src_run, f"train.init_from={src}")
    load_checkpoint(ckpt)  # verifies its recorded SHA-256 and that it is a readable semisam checkpoint
    data = ckpt.read_bytes()
    digest = sha256_hex(data)
    folder = RunFolder(cfg.run_dir)
    ours = folder.checkpoint(0)
    ours.write_bytes(data)
    checksum_path(ours).write_text(f"{digest}  {ours.name}\n")
    if src_run.table("eval", 0).exists():
        folder.table("eval", 0).write_bytes(src_run.table("eval", 0).read_bytes())
    src_state = src_run.read_state()
    summary = next((dict(s) for s in src_state["summaries"] if s["round"] == 0), asdict(RoundSummary(0, 0.0)))
    summary["train"] = {**summary.get("train", {}), "warm_start_from": ckpt.url}
    state["init_from"] = {"checkpoint": ckpt.url, "sha256": digest}
    state["checkpoints"]["0"] = digest
    state["completed"].append(0)
    state["summaries"].append(summary)
    folder.save_state(state)
    log.info("round 0 taken from %s (SHA-256 %s...)", ckpt, digest[:16])
