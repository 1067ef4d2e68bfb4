"""The coordinator: alternates relabeling rounds and training rounds on Ray, survives faults, resumes runs.

    round 0:   train (no pseudo-labels)                      -> checkpoint 0 -> evaluate
    round r>0: relabel unlabeled cases with checkpoint r-1   -> store round r
               train with the round-r pseudo-labels          -> checkpoint r -> evaluate

With the pseudo-label term off (``train.pseudo_label.enabled: false`` or weight 0, e.g. plain Mean
Teacher) no SAM pool is started and every round only trains.

Run folder (``output_dir/name``, a local path or an fsspec URL, see pipeline.storage)::

    config.yaml          the resolved config, absolute paths (a resumed run must match it, except
                         rounds/workers/device)
    state.json           completed rounds, their one-line summaries, each checkpoint's SHA-256 (and the
                         training statistics of a published checkpoint)
    driver.lock          the driver that owns the folder (pipeline.run_lock)
    checkpoints/         ckpt_NNNN.pt (+ .sha256), one per round
    pseudo_labels/       the store (masks.zarr + manifest/), see pipeline.store
    embeddings.zarr/     the embedding cache
    eval/round_NNN.parquet, audit/round_NNN.parquet, selection/round_NNN.parquet
    tb/                  TensorBoard events (pipeline.events)

Provenance: eval tables, pseudo-label cases and manifest rows record the SHA-256 of the checkpoint they
came from; a resume checks that chain (``_check_chain``) and redoes what no longer matches its source.

What survives what (the README has the table): a SAM actor that dies, or hangs (``HangWatch``), has its
cases re-queued to any live actor (``faults.case_attempts`` tries per case); a trainer that dies or
hangs is restarted by Ray and restores the newest published checkpoint: a round's training and its
publication are redone together, an evaluation is redone on the round's own checkpoint; a lost node is
the same path; a killed driver resumes after the last completed round (a checkpoint it had already
published is evaluated, not retrained), and inside a relabel round only cases that are not both in the
manifest and in the arrays, readable and made by the current checkpoint, are redone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import ray
import yaml
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from pipeline.checkpoint import checkpoint_path
from pipeline.class_source import configured_sources, decide, needs_selection
from pipeline.class_source import describe as describe_sources
from pipeline.config import RunConfig, config_differences, dump_config, with_absolute_paths, with_defaults
from pipeline.data.dataset import read_data
from pipeline.data.splits import resolve_selection, resolve_split
from pipeline.data.validate import labels_from_data, validate_cases, warn_derived_labels
from pipeline.errors import ConfigError, HungError, PlacementError, SemisamError, StoreError, WorkerError
from pipeline.evaluation import audit_pseudo_labels, round_means
from pipeline.events import EventLog, round_scalars
from pipeline.generalist.factory import generalist_name
from pipeline.interrupt import POLL_SECONDS, StopFlag
from pipeline.placement import describe, plan_pool, request_of
from pipeline.pool import (
    DEAD,
    HEARTBEAT_SECONDS,
    SILENT_SECONDS,
    HangWatch,
    SamPool,
    creation_failed,
    kill_actor,
    short_cause,
    task_error_cause,
)
from pipeline.progress import Progress
from pipeline.ray_runtime import init_ray, remote_actor
from pipeline.run_lock import RunLock
from pipeline.storage import Location, check_writable, read_table, sha256_hex, write_table
from pipeline.store import PseudoLabelStore
from workers.sam_worker import SamWorker
from workers.trainer import TrainerWorker

log = logging.getLogger(__name__)

# Keys a resumed run may change: where it runs (workers, device) and how many rounds (the schedule those
# rounds follow is train.schedule_rounds, kept from the run's start, so more rounds change no earlier one).
RESUMABLE_CHANGES = ("rounds", "workers", "device")
# How often the coordinator appends finished cases to the manifest during a relabel round. Each append
# is one new part file; a crash loses at most the cases of the last interval, which a resume redoes.
MANIFEST_FLUSH_SECONDS = 10.0
# Calls queued per ready SAM actor (one running, one waiting, so an actor never idles between cases).
CALLS_PER_ACTOR = 2
# How long the driver waits for the SAM actors' counters at the end of a run (they are only statistics).
STATS_TIMEOUT_S = 10.0


class _TrainerLost(Exception):
    """The trainer died or hung during a call (internal: turned into a restart, or a WorkerError)."""


@dataclass
class RoundSummary:
    round: int
    seconds: float
    train: dict = field(default_factory=dict)
    relabel: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"round {self.round}"]
        if self.relabel:
            r = self.relabel
            cached = (f"cached embeddings {r['cached_slices']}/{r['prompted_slices']}"
                      if r.get("cacheable", True) else "no embeddings (weight-free generalist)")
            parts.append(f"relabel {r['cases']} cases/{r['slices']} slices, score {r['score_mean']:.3f}, {cached}")
            if r.get("ensemble", 1) > 1:
                parts.append(f"{r['ensemble']}-member prompt ensemble, foreground uncertainty {r['fg_uncertainty']:.3f}")
            if r.get("failed_cases"):
                parts.append(f"{len(r['failed_cases'])} cases given up")
            if r.get("class_source"):
                parts.append("class sources " + ", ".join(f"{c}: {s}" for c, s in r["class_source"].items()))
        parts.append(f"train loss {self.train.get('loss', float('nan')):.4f}")
        if self.test:
            unit = "vox" if "hd95_vox" in self.test else "mm"
            hd = self.test.get(f"hd95_{unit}", float("nan"))
            asd = self.test.get(f"asd_{unit}", float("nan"))
            nan = f" ({self.test['hd95_nan']}/{self.test['pairs']} pairs without distance)" if "pairs" in self.test else ""
            parts.append(f"test Dice {self.test['dice']:.4f} HD95 {hd:.2f} {unit} ASD {asd:.2f} {unit}{nan}")
        if self.audit:
            parts.append(f"audit pseudo Dice {self.audit['pseudo_dice']:.4f} vs specialist "
                         f"{self.audit['specialist_dice']:.4f}")
            if len(self.audit.get("by_class", {})) > 1:
                parts.append("per class " + ", ".join(f"{c}: {v['pseudo_dice']:.3f} vs {v['specialist_dice']:.3f}"
                                                      for c, v in self.audit["by_class"].items()))
            if "pseudo_dice_certain" in self.audit:
                parts.append(f"on certain voxels {self.audit['pseudo_dice_certain']:.4f} vs "
                             f"{self.audit['specialist_dice_certain']:.4f} ({self.audit['certain_fraction']:.3f} "
                             "of the pseudo-label certain)")
        parts.append(f"{self.seconds:.1f} s")
        return " | ".join(parts)


def read_state(run_dir: Location) -> dict:
    """state.json of a run folder (an empty state when there is none); a damaged file is named."""
    loc = run_dir / "state.json"
    if not loc.exists():
        return {"completed": [], "summaries": [], "checkpoints": {}}
    try:
        state = json.loads(loc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{loc} is damaged ({e}); it records which rounds are done. Restore it, or delete it "
                          "to redo every round (checkpoints and pseudo-labels are rewritten)") from None
    state.setdefault("checkpoints", {})
    return state


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """Create or reopen the run folder; returns the config to run with (``train.schedule_rounds`` fixed: the
    saved run's, else ``rounds``) and the saved state (see ``read_state``)."""
    run_dir = cfg.run_dir
    saved_cfg = run_dir / "config.yaml"
    schedule = cfg.train.schedule_rounds or cfg.rounds
    if saved_cfg.exists():
        old = with_defaults(yaml.safe_load(saved_cfg.read_text()))  # keys added since: their defaults
        old["train"]["schedule_rounds"] = old["train"].get("schedule_rounds") or old["rounds"]
        schedule = cfg.train.schedule_rounds or old["train"]["schedule_rounds"]
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"schedule_rounds": schedule})})
    if saved_cfg.exists():
        changed = config_differences(old, cfg.model_dump(mode="json"), ignored=RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(
                f"run folder {run_dir} holds a run with another config (differs in: {', '.join(changed)}); "
                "resume it with the same config, or pick a new name= / output_dir="
            )
    run_dir.mkdir()
    saved_cfg.write_text(dump_config(cfg))
    return cfg, read_state(run_dir)


def check_not_in_job_package(cfg: RunConfig) -> None:
    """Under ``ray job submit --working-dir`` the driver runs in a temporary copy of the project that Ray
    deletes with the job: a run folder there would vanish."""
    run_dir = cfg.run_dir
    if run_dir.is_local and "runtime_resources" in run_dir.path.split(os.sep):
        raise ConfigError(
            f"the run folder {run_dir} is inside Ray's temporary job package (deleted when the job ends): give "
            "an absolute output_dir on storage every node sees, e.g. output_dir=/shared/runs or s3://bucket/runs")


def preflight(cfg: RunConfig) -> tuple[RunConfig, object, object]:
    """Everything that can be checked before any work starts: dataset, split, SAM checkpoint, storage.
    Returns (config, dataset info, split); the config gains ``data.labels`` when the classes had to be
    taken from the label values (:func:`pipeline.data.validate.labels_from_data`), so that every actor,
    and a resume, sees the same classes."""
    from pipeline.generalist.sam import check_sam_checkpoint

    check_not_in_job_package(cfg)
    info = read_data(cfg.data)
    split = resolve_split(cfg.data, info)
    derived = labels_from_data(info, split)
    if derived is not None:
        warn_derived_labels(info, derived, len(split.labeled) + len(split.test))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": derived})})
        info = read_data(cfg.data)
    validate_cases(info, split, check_unlabeled_labels=cfg.eval.audit_pseudo_labels)
    g = cfg.generalist
    if g.backend == "sam" and cfg.train.pseudo_label.active and split.unlabeled:
        check_sam_checkpoint(g.sam)
        if g.cache_embeddings and g.cache_dir:
            # a shared cache that cannot be written would otherwise show as every case failing in a worker
            check_writable(Location.of(g.cache_dir, cfg.storage_options), "generalist.cache_dir")
    check_writable(cfg.run_dir)
    if cfg.train.pseudo_label.active and split.unlabeled and needs_selection(g.class_source, info.foreground_classes):
        cases, source = resolve_selection(cfg.data, info, split)
        if not cases:
            raise ConfigError("generalist.class_source: auto needs labeled selection cases (data.selection)")
        if source.startswith("the labeled training cases"):
            log.warning("generalist.class_source auto: no held-out labeled cases (data.selection, val.list); "
                        "scoring on %s, where the specialist's Dice is optimistic (it trained on them), so the "
                        "generalist is taken only where it beats the specialist on its own training data", source)
        else:
            log.info("generalist.class_source auto: %d selection cases from %s", len(cases), source)
        split = replace(split, selection=cases)
    if not split.unlabeled and cfg.rounds > 1:
        log.warning("no unlabeled cases: rounds after 0 only train further")
    return cfg, info, split


def _cpu_gpu(resources: dict) -> dict:
    """Resources worth naming to a user (no per-node markers, no memory byte counts)."""
    return {k: v for k, v in resources.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}


class Coordinator:
    """Owns the actors of one run and drives its rounds. Holds the run folder's lock while it lives."""

    def __init__(self, cfg: RunConfig, on_event=None):
        """``on_event(name, coordinator, **details)``: called at round/task boundaries (progress, tests)."""
        self.cfg = cfg = with_absolute_paths(cfg)
        self.on_event = on_event or (lambda *a, **k: None)
        self.stop = StopFlag()
        cfg, self.info, self.split = preflight(cfg)  # the config may gain data.labels (see preflight)
        self.cfg = cfg
        self.faults = cfg.workers.faults
        self.lock = RunLock(cfg.run_dir, self.faults.lock_stale_s).acquire()
        self._started_ray = False
        self.trainer = None
        self.trainer_info: dict = {}
        self.trainer_restarts = 0
        self.pool: SamPool | None = None
        self.hang_watch = HangWatch(cfg.workers.faults.hung_after_s, cfg.workers.faults.hung_factor)
        try:
            self.cfg, self.state = prepare_run_dir(self.cfg)
            self.events = EventLog(cfg.run_dir, "rounds")  # TensorBoard: tensorboard --logdir <run folder>/tb
            self.store = PseudoLabelStore(cfg.run_dir / "pseudo_labels", create=True,
                                          class_ids=self.info.foreground_classes, slice_axis=cfg.data.slice_axis)
            # Without the pseudo-label term there is nothing to relabel: no SAM pool, rounds only train.
            self.relabels = bool(self.split.unlabeled) and cfg.train.pseudo_label.active
            self._started_ray = init_ray(cfg.workers)
            self._place_actors()
        except BaseException:
            self.shutdown()
            raise

    # -- actors ----------------------------------------------------------------------------------
    def _actor_options(self, cls, resources):
        # the trainer answers ``alive`` from a thread of its own while a long call runs (hang detection)
        groups = {"concurrency_groups": {"health": 1}} if hasattr(cls, "alive") else {}
        return remote_actor(cls, resources, max_restarts=self.faults.actor_restarts, max_task_retries=0, **groups)

    def _place_actors(self) -> None:
        w = self.cfg.workers
        plan = plan_pool(w.trainer, w.sam, self.relabels)
        if not plan.trainer_fits:
            raise PlacementError(f"the cluster cannot place the run: {plan.message}")
        if plan.message:
            log.warning("placement: %s", plan.message)
        if self.relabels and plan.sam_placeable < w.sam.min_workers:
            raise PlacementError(f"the cluster cannot place the SAM pool: {plan.message} "
                                 f"(workers.sam.min_workers={w.sam.min_workers}); add nodes or lower the request")
        self.sam_wanted = plan.sam_wanted
        if self.relabels and isinstance(w.sam.num_workers, int) and plan.sam_placeable < w.sam.num_workers:
            log.warning("starting %d SAM actors; %d more wait for room in the cluster and join when placed",
                        min(plan.sam_placeable, w.sam.num_workers), w.sam.num_workers - plan.sam_placeable)
        cfg_dict = self.cfg.model_dump(mode="json")
        self.trainer = self._actor_options(TrainerWorker, w.trainer).remote(cfg_dict)
        if self.relabels:
            factory = self._actor_options(SamWorker, w.sam)
            self.pool = SamPool(lambda i: factory.remote(cfg_dict, i), self.lock.token)
            self.pool.grow(self.sam_wanted)
        self._await_trainer()

    def _await_trainer(self) -> None:
        """Wait until the trainer answers (placed, data loaded, sees the run folder)."""
        deadline = time.monotonic() + self.faults.placement_timeout_s
        while True:
            try:
                info = self._get(self.trainer.ready.remote(self.lock.token), deadline=deadline)
                self.trainer_info = info
                log.info("trainer ready on %s (pid %s, GPUs %s)", info.get("host"), info.get("pid"),
                         info.get("gpu_ids") or "none")
                return
            except GetTimeoutError:
                raise PlacementError(
                    f"the trainer ({describe(request_of(self.cfg.workers.trainer))}) did not answer within "
                    f"{self.faults.placement_timeout_s:.0f} s (workers.faults.placement_timeout_s): either the "
                    f"cluster cannot place it (free now: {describe(_cpu_gpu(ray.available_resources()))}; free or "
                    "add resources) or loading its data takes longer (raise the timeout)") from None
            except RayActorError as e:
                if isinstance(e, ActorDiedError) and creation_failed(e):
                    raise WorkerError(f"the trainer could not start: {short_cause(e)}") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"the trainer did not come back: {short_cause(e)}") from None
                time.sleep(0.5)  # restarting: ask again

    def _get(self, ref, deadline: float | None = None, watch=None):
        """``ray.get`` that wakes every POLL_SECONDS for Ctrl-C/SIGTERM; GetTimeoutError past ``deadline``.

        ``watch`` (an actor handle with an ``alive`` method in its own concurrency group): while waiting,
        the actor is asked ``alive()`` every ``HEARTBEAT_SECONDS``; one that has not answered for
        ``faults.hung_after_s`` is declared hung (HungError): a stopped or wedged process never answers,
        a busy one does (from its own thread)."""
        beat, beat_sent, last_answer = None, 0.0, time.monotonic()
        while True:
            self.stop.check()
            ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
            if ready:
                return ray.get(ref)
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise GetTimeoutError("deadline passed")
            if watch is None:
                continue
            if beat is not None and ray.wait([beat], timeout=0)[0]:
                beat, last_answer = None, now
            if beat is None and now - beat_sent >= HEARTBEAT_SECONDS:
                beat, beat_sent = watch.alive.remote(), now
            if now - last_answer > self.faults.hung_after_s:
                raise HungError(f"no answer to a heartbeat for {now - last_answer:.0f} s "
                                f"(workers.faults.hung_after_s={self.faults.hung_after_s:.0f})")

    def _trainer_once(self, what: str, method: str, *args):
        """One trainer call. An error the method raises is final (SemisamError as is, else WorkerError); a
        trainer that dies or hangs (then killed: Ray restarts it) raises _TrainerLost."""
        try:
            return self._get(getattr(self.trainer, method).remote(*args), watch=self.trainer)
        except RayTaskError as e:
            cause = task_error_cause(e)
            if isinstance(cause, SemisamError):
                raise cause from None
            raise WorkerError(f"the trainer failed in {what}: {short_cause(e)}") from None
        except RayActorError as e:
            raise _TrainerLost(short_cause(e)) from None
        except HungError as e:
            where = f"pid {self.trainer_info.get('pid')} on {self.trainer_info.get('host')}"
            log.error("the trainer (%s) is hung in %s: %s; killing it (Ray restarts it)", where, what, e)
            kill_actor(self.trainer, self.trainer_info)
            raise _TrainerLost(f"hung in {what}: {e}") from None

    def _trainer_call(self, what: str, method: str, *args):
        """Call a trainer method; if the trainer dies or hangs, wait for Ray to restart it, reload the newest
        published checkpoint and call again (``faults.trainer_attempts`` tries)."""
        return self._with_trainer_retries(what, lambda: self._trainer_once(what, method, *args))

    def _with_trainer_retries(self, what: str, body):
        for attempt in range(1, self.faults.trainer_attempts + 1):
            try:
                if attempt > 1:
                    self._revive_trainer()
                return body()
            except _TrainerLost as e:
                if attempt == self.faults.trainer_attempts:
                    raise WorkerError(f"the trainer was lost {attempt} times in {what} (last: {e}); stopping. "
                                      "Rerun to resume after the last completed round") from None
                log.warning("the trainer was lost in %s (%s); restarting it from the newest published checkpoint "
                            "(try %d of %d)", what, e, attempt + 1, self.faults.trainer_attempts)
        raise AssertionError("unreachable")

    def _train_and_publish(self, r: int, pseudo_round: int | None, pseudo_cases: list[str] | None) -> tuple[dict, str]:
        """Train round ``r`` and publish checkpoint ``r`` as one unit: a trainer lost in either is restored to
        checkpoint ``r - 1`` and trains again, so a checkpoint always holds its own round's training."""
        def body():
            stats = self._trainer_once(f"training round {r}", "train_round", r, pseudo_round, pseudo_cases)
            return stats, self._trainer_once(f"publishing checkpoint {r}", "publish", r)
        return self._with_trainer_retries(f"training round {r}", body)

    def _revive_trainer(self) -> None:
        """After the trainer died or hung: wait for it (Ray restarts it) or start a new one, then restore the
        newest published checkpoint (the current round's when it was published before the loss)."""
        self.trainer_restarts += 1
        try:
            self._await_trainer()
        except (WorkerError, PlacementError) as e:
            log.warning("the trainer did not come back (%s); starting a new one", e)
            self.trainer = self._actor_options(TrainerWorker, self.cfg.workers.trainer).remote(
                self.cfg.model_dump(mode="json"))
            self._await_trainer()
        if self.state["checkpoints"]:
            newest = max(int(v) for v in self.state["checkpoints"])
            self._trainer_once("restoring", "restore", newest, self.state["checkpoints"][str(newest)])
            log.info("trainer restored checkpoint %d", newest)

    def shutdown(self) -> None:
        try:
            if self.trainer is not None:
                ray.kill(self.trainer)
            if self.pool is not None:
                self.pool.kill()
        except Exception as e:  # noqa: BLE001 - shutting down after a failure: report, go on
            log.debug("killing actors: %s", e)
        if self._started_ray:
            try:
                ray.shutdown()
            except Exception as e:  # noqa: BLE001 - shutting down, maybe after another error: never raise over it
                log.warning("stopping the local Ray cluster: %s", e)
            self._started_ray = False
        if getattr(self, "events", None) is not None:
            self.events.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    # -- rounds ----------------------------------------------------------------------------------
    def _check_chain(self) -> list[int]:
        """The completed rounds whose provenance holds; from the first broken link on, rounds are redone.

        Round r's links: checkpoint r exists with a SHA-256 in state.json; its test table, if any, was
        computed with that checkpoint; its pseudo-labels were made by checkpoint r - 1 as state.json
        records it. (A checkpoint's bytes are verified when it is loaded.) A checkpoint published by the
        unfinished round after the last completed one is kept when its file is there: that round then
        evaluates it instead of training again."""
        completed = sorted(self.state["completed"])
        for r in completed:
            why = self._broken_link(r)
            if why:
                log.warning("round %d of %s: %s; rounds %d.. are redone", r, self.cfg.run_dir, why, r)
                self.state["completed"] = [c for c in completed if c < r]
                self.state["summaries"] = [s for s in self.state["summaries"] if s["round"] < r]
                self._forget_checkpoints_from(r)
                self._save_state()
                return self.state["completed"]
        nxt = completed[-1] + 1 if completed else 0
        if not checkpoint_path(self.cfg.run_dir, nxt).is_file():
            self._forget_checkpoints_from(nxt)
        self._forget_checkpoints_from(nxt + 1)
        return completed

    def _broken_link(self, r: int) -> str | None:
        """Why completed round ``r`` cannot stand (see ``_check_chain``), or None."""
        if not checkpoint_path(self.cfg.run_dir, r).is_file():
            return f"checkpoint {r} is missing"
        sha = self.state["checkpoints"].get(str(r))
        if not sha:
            return f"checkpoint {r} has no SHA-256 in state.json"
        eval_loc = self.cfg.run_dir / "eval" / f"round_{r:03d}.parquet"
        if eval_loc.exists():
            table = read_table(eval_loc)
            if "checkpoint_sha256" in table and set(table["checkpoint_sha256"].dropna()) - {sha}:
                return f"its test table {eval_loc.name} was computed with another checkpoint than checkpoint {r}"
        if r > 0 and self.relabels:
            want = self.state["checkpoints"].get(str(r - 1))
            made_by = set(self.store.manifest(r)["checkpoint_sha256"]) - {""}
            if want and made_by - {want}:
                return f"its pseudo-labels were made by another checkpoint {r - 1} than state.json records"
        return None

    def _forget_checkpoints_from(self, r: int) -> None:
        """Drop the recorded SHA-256s (and training statistics) of checkpoints ``r``.. (they are redone)."""
        for key in ("checkpoints", "train_stats"):
            for v in [k for k in self.state.get(key, {}) if int(k) >= r]:
                del self.state[key][v]

    def _warm_start(self) -> None:
        """Take round 0 from ``train.init_from`` (see the config docstring): its checkpoint (verified),
        eval table and round-0 summary become this run's, recorded in state.json."""
        src = Location.of(self.cfg.train.init_from, self.cfg.storage_options)
        src_run = src.parent.parent if src.name.endswith(".pt") else src
        ckpt = src if src.name.endswith(".pt") else checkpoint_path(src, 0)
        where = f"train.init_from={src}"
        if not (src_run / "config.yaml").exists():
            raise ConfigError(f"{where}: {src_run} is not a run folder (no config.yaml)")
        theirs = with_defaults(yaml.safe_load((src_run / "config.yaml").read_text()))
        mine = self.cfg.model_dump(mode="json")
        theirs["train"]["schedule_rounds"] = theirs["train"].get("schedule_rounds") or theirs["rounds"]
        free = ["train.pseudo_label", "train.init_from", "train.progress_seconds", "train.log_every"]
        if mine["train"]["method"] != "uamt":  # only UA-MT's round 0 follows the run-long schedule
            free.append("train.schedule_rounds")
        diffs = config_differences(theirs, mine, compared=("data", "model", "seed", "train"), ignored=tuple(free))
        if diffs:
            raise ConfigError(f"{where}: its round 0 was trained with other settings (differs in: "
                              f"{', '.join(sorted(diffs))}); a warm start needs the same data, split, model, seed "
                              "and training settings")
        from pipeline.checkpoint import checksum_path, load_checkpoint

        load_checkpoint(ckpt)  # verifies its recorded SHA-256 and that it is a readable semisam checkpoint
        data = ckpt.read_bytes()
        digest = sha256_hex(data)
        ours = checkpoint_path(self.cfg.run_dir, 0)
        ours.write_bytes(data)
        checksum_path(ours).write_text(f"{digest}  {ours.name}\n")
        src_eval = src_run / "eval" / "round_000.parquet"
        if src_eval.exists():
            (self.cfg.run_dir / "eval" / "round_000.parquet").write_bytes(src_eval.read_bytes())
        src_state = read_state(src_run)
        summary = next((dict(s) for s in src_state["summaries"] if s["round"] == 0), asdict(RoundSummary(0, 0.0)))
        summary["train"] = {**summary.get("train", {}), "warm_start_from": ckpt.url}
        self.state["init_from"] = {"checkpoint": ckpt.url, "sha256": digest}
        self.state["checkpoints"]["0"] = digest
        self.state["completed"].append(0)
        self.state["summaries"].append(summary)
        self._save_state()
        log.info("round 0 taken from %s (SHA-256 %s...)", ckpt, digest[:16])

    def run(self) -> list[RoundSummary]:
        with self.stop:
            if self.cfg.train.init_from and 0 not in self.state["completed"]:
                self._warm_start()
            completed = self._check_chain()
            if completed:
                self._repair_completed(completed)
                last = completed[-1]
                self._trainer_call("restore", "restore", last, self.state["checkpoints"].get(str(last)))
                log.info("resuming %s after round %d", self.cfg.run_dir, last)
            summaries = [RoundSummary(**s) for s in self.state["summaries"]]
            for r in range(self.cfg.rounds):
                if r in completed:
                    continue
                log.info("round %d starts (rounds 0 to %d)", r, self.cfg.rounds - 1)
                summary = self.run_round(r)
                summaries.append(summary)
                log.info(summary.line())
                self.events.scalars(r, round_scalars(asdict(summary), self.info.labels))
                self.state["completed"].append(r)
                self.state["summaries"].append(asdict(summary))
                self._save_state()
                self.on_event("round_done", self, round=r)
            return summaries

    def _save_state(self) -> None:
        (self.cfg.run_dir / "state.json").write_text(json.dumps(self.state, indent=1))

    def run_round(self, r: int) -> RoundSummary:
        start = time.perf_counter()
        summary = RoundSummary(round=r, seconds=0.0)
        pseudo_cases: list[str] | None = None
        if r > 0 and self.relabels:
            summary.relabel = self.relabel_round(r, checkpoint_version=r - 1)
            pseudo_cases = sorted(self.store.completed_cases(r))
            if self.cfg.eval.audit_pseudo_labels and pseudo_cases:
                audit = audit_pseudo_labels(self.store, self.info, r, pseudo_cases, self.info.foreground_classes)
                write_table(audit, self.cfg.run_dir / "audit" / f"round_{r:03d}.parquet")
                summary.audit = {"pseudo_dice": float(audit["pseudo_dice"].mean()),
                                 "specialist_dice": float(audit["specialist_dice"].mean())}
                by_class = audit.groupby("class_id")[["pseudo_dice", "specialist_dice"]].mean()
                summary.audit["by_class"] = {str(c): {k: round(float(v), 4) for k, v in row.items()}
                                             for c, row in by_class.iterrows()}
                if audit["pseudo_dice_certain"].notna().any():  # a prompt ensemble: Dice where all members agree
                    summary.audit.update({k: float(audit[k].mean()) for k in (
                        "pseudo_dice_certain", "specialist_dice_certain", "certain_fraction")})
        pseudo_round = r if pseudo_cases else None
        published = self.state["checkpoints"].get(str(r))
        if published and summary.relabel.get("relabeled_now", 0) == 0:
            # published before the driver was stopped, from the same pseudo-labels: used, not retrained
            self._trainer_call(f"restoring checkpoint {r}", "restore", r, published)
            summary.train = dict(self.state.get("train_stats", {}).get(str(r), {}))
            log.info("round %d: checkpoint %d was published before the interruption; it is used, not retrained", r, r)
        else:
            self._forget_checkpoints_from(r)
            self.on_event("train_start", self, round=r)
            summary.train, sha = self._train_and_publish(r, pseudo_round, pseudo_cases)
            self.state["checkpoints"][str(r)] = sha
            self.state.setdefault("train_stats", {})[str(r)] = summary.train
            self._save_state()
        self.on_event("published", self, round=r)
        if self.split.test and (self.cfg.eval.every_round or r == self.cfg.rounds - 1):
            summary.test = round_means(self._trainer_call(f"evaluating round {r}", "evaluate", r))
        summary.seconds = time.perf_counter() - start
        return summary

    # -- relabeling ------------------------------------------------------------------------------
    def _invalid_cases(self, r: int) -> set[str]:
        """Cases with manifest rows in round ``r`` that must not be used, their rows removed so that they are
        redone: arrays missing, a chunk that fails its checksum (every chunk of the round is read), or
        made by another checkpoint than the ``r - 1`` that state.json records (it was retrained since)."""
        m = self.store.manifest(r)
        done = set(m["case_id"])
        if not done:
            return set()
        want = self.state["checkpoints"].get(str(r - 1), "")
        sha = m["checkpoint_sha256"].astype(str)
        other = m[(sha != "") & (sha != want)] if want else m.iloc[:0]
        bad = {c: f"made by checkpoint {r - 1} with SHA-256 {s[:12]}..., now {want[:12]}..."
               for c, s in zip(other["case_id"], other["checkpoint_sha256"], strict=True)}
        present = self.store.case_status(r)
        bad.update({c: "arrays missing" for c in done - set(bad) if not present.get(c, False)})
        bad.update(self.store.damaged_cases(r, sorted(done - set(bad))))
        if bad:
            shown = "; ".join(f"{c}: {why}" for c, why in sorted(bad.items())[:5])
            log.warning("round %d: %d cases in the manifest cannot be used and are redone (%s%s)", r, len(bad),
                        shown, " ..." if len(bad) > 5 else "")
            self.store.remove_cases(r, set(bad))
        return set(bad)

    def _todo(self, r: int) -> list[str]:
        """Unlabeled cases not yet (validly) done in round ``r`` (see ``_invalid_cases``); a case with arrays
        but no rows is simply redone (its arrays are replaced whole)."""
        self._invalid_cases(r)
        done = self.store.completed_cases(r)
        todo = [c for c in self.split.unlabeled if c not in done]
        if done:
            log.info("round %d: %d cases already relabeled, %d to go", r, len(done), len(todo))
        return todo

    def _repair_completed(self, completed: list[int]) -> None:
        """Redo the cases of completed relabel rounds that cannot be used (``_invalid_cases``) with the
        checkpoint that made them, so the record is whole again; the rounds' training is not redone (it
        used the cases before they were lost). Given-up cases stay given up."""
        if not self.relabels:
            return
        for r in (r for r in completed if r > 0):
            redo = sorted(self._invalid_cases(r))
            if redo:
                log.info("round %d is completed; relabeling %d of its cases again with checkpoint %d", r,
                         len(redo), r - 1)
                self._trainer_call(f"restoring checkpoint {r - 1}", "restore", r - 1,
                                   self.state["checkpoints"].get(str(r - 1)))
                self.relabel_round(r, r - 1, cases=redo)

    def relabel_round(self, r: int, checkpoint_version: int, cases: list[str] | None = None) -> dict:
        """Hand whole cases to the SAM pool (a work queue, ``CALLS_PER_ACTOR`` calls per ready actor) and
        append the manifest as calls return. A call whose actor died goes back to the queue; a case that
        keeps failing is given up after ``faults.case_attempts`` tries. An actor whose call runs past the
        deadline (``HangWatch``) is declared hung: named, killed (Ray restarts it), its cases re-queued.
        ``cases``: only these (a repair); default every case not yet done."""
        assert self.pool is not None
        self.store.ensure_round(r, checkpoint_version, generalist_name(self.cfg.generalist))
        todo = self._todo(r) if cases is None else list(cases)
        sources, evidence = self._class_sources(r, checkpoint_version) if todo else (None, {})
        added = self.pool.grow(self.sam_wanted)
        if added:
            log.info("round %d: started %d more SAM actors (pool of %d wanted)", r, added, self.sam_wanted)
        # The specialist travels through the object store once; actors fetch it when their version differs
        # (also after a restart). The driver owns the object, so it outlives a trainer that dies; wrapped in
        # a list so Ray passes the reference, not the value.
        weights_ref = ray.put(self._trainer_call("sharing weights", "weights", checkpoint_version))
        sha = self.state["checkpoints"][str(checkpoint_version)]
        spec = (checkpoint_version, self._trainer_call("sharing model args", "model_args"), [weights_ref], sources, sha)
        k = self.cfg.workers.sam.cases_per_task
        queue = [todo[i:i + k] for i in range(0, len(todo), k)]
        attempts: dict[str, int] = {}
        failed: dict[str, str] = {}
        in_flight: dict = {}     # ref -> (member, cases)
        pending: list[dict] = []
        last_flush = time.monotonic()
        no_worker_since: float | None = None
        progress = Progress(f"relabel round {r}", len(todo), "cases", log)

        def give_back(cases: list[str], why: str, count: bool = True) -> None:
            for c in cases:
                attempts[c] = attempts.get(c, 0) + (1 if count else 0)
                if attempts[c] >= self.faults.case_attempts:
                    failed[c] = why
                    log.error("round %d: giving up on case %s after %d tries: %s", r, c, attempts[c], why)
                    progress.advance(1)
                else:
                    queue.append([c])

        try:
            while queue or in_flight:
                self.stop.check()
                for m in self.pool.ready():
                    busy = sum(1 for mm, _ in in_flight.values() if mm is m)
                    while queue and busy < CALLS_PER_ACTOR:
                        cases = queue.pop(0)
                        in_flight[m.handle.relabel.remote(cases, r, *spec)] = (m, cases)
                        self.hang_watch.submitted(m, was_idle=busy == 0)
                        busy += 1
                for m, seconds in self.hang_watch.hung(self.pool.members):
                    held = [ref for ref, (mm, _) in in_flight.items() if mm is m]
                    log.error("round %d: %s has not returned a call for %.0f s (deadline %.0f s: max(%.0f s, %g x "
                              "the median call; workers.faults.hung_after_s, hung_factor)) and has not answered "
                              "alive() for %.0f s: declared hung, killed and restarted; its cases go back to the "
                              "queue", r, m.label, seconds, self.hang_watch.deadline(), self.faults.hung_after_s,
                              self.faults.hung_factor, SILENT_SECONDS)
                    kill_actor(m.handle, m.info)
                    self.hang_watch.forget(m)
                    self.pool.lost(m, HungError(f"no answer for {seconds:.0f} s"))
                    for i, ref in enumerate(held):  # calls run in order: only the first was running
                        give_back(in_flight.pop(ref)[1], f"{m.label} hung ({seconds:.0f} s without an answer)",
                                  count=i == 0)
                if not in_flight:
                    if not self.pool.alive():
                        raise PlacementError(f"round {r}: every SAM actor is gone ({len(queue)} tasks left); "
                                             "the cluster cannot place the pool any more")
                    no_worker_since = no_worker_since or time.monotonic()
                    if time.monotonic() - no_worker_since > self.faults.placement_timeout_s:
                        raise PlacementError(
                            f"round {r}: no SAM actor has been ready for {self.faults.placement_timeout_s:.0f} s "
                            f"(each asks for {describe(request_of(self.cfg.workers.sam))}; free now: "
                            f"{describe(_cpu_gpu(ray.available_resources()))})")
                else:
                    no_worker_since = None
                refs = list(in_flight) + self.pool.pings()
                ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS) if refs else ([], [])
                if not refs:
                    time.sleep(POLL_SECONDS)
                for ref in ready:
                    member = self.pool.owner_of_ping(ref)
                    if member is not None:
                        self.pool.resolve_ping(member)
                        continue
                    if ref not in in_flight:  # a call of an actor declared hung: its cases went back already
                        continue
                    m, cases = in_flight.pop(ref)
                    self.hang_watch.returned(m, more_queued=any(mm is m for mm, _ in in_flight.values()))
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:
                        if isinstance(task_error_cause(e), StoreError):  # storage failed or full: stop, resumable
                            raise task_error_cause(e) from None
                        give_back(cases, f"{m.label}: {short_cause(e)}")
                        continue
                    except RayActorError as e:
                        self.hang_watch.forget(m)
                        self.pool.lost(m, e)
                        give_back(cases, f"{m.label} died: {short_cause(e)}")
                        continue
                    pending.extend(result["rows"])
                    for c, why in result["failed"].items():
                        log.warning("round %d: %s failed on case %s: %s", r, m.label, c, why)
                        give_back([c], f"{m.label}: {why}")
                    progress.advance(len(cases) - len(result["failed"]),
                                     extra=f"{len(self.pool.ready())} SAM actors")
                    self.on_event("task_done", self, round=r, cases=cases, member=m.index)
                if pending and (not in_flight or time.monotonic() - last_flush > MANIFEST_FLUSH_SECONDS):
                    self.store.append_manifest(pending)
                    pending, last_flush = [], time.monotonic()
        except BaseException as first:  # also when interrupted: what is finished is kept
            if pending:
                try:
                    self.store.append_manifest(pending)
                except Exception as e:  # noqa: BLE001 - never raise over the first error; a resume redoes them
                    log.warning("round %d: the last %d finished cases could not be added to the manifest (%s); "
                                "a resume redoes them", r, len({row["case_id"] for row in pending}),
                                short_cause(e))
            raise first
        if pending:
            self.store.append_manifest(pending)
        if failed:
            frac = len(failed) / max(1, len(self.split.unlabeled))
            msg = f"round {r}: gave up on {len(failed)} of {len(self.split.unlabeled)} cases"
            if frac > self.faults.max_failed_fraction:
                first = "; ".join(f"{c}: {w}" for c, w in list(failed.items())[:3])
                raise WorkerError(f"{msg} (more than workers.faults.max_failed_fraction="
                                  f"{self.faults.max_failed_fraction}); first: {first}")
            log.warning("%s; training goes on without them", msg)
        dead = [m for m in self.pool.members if m.state == DEAD]
        if todo and (dead or len(self.pool.ready()) < self.sam_wanted):  # a round with nothing to do used no actor
            log.warning("round %d ran with %d of %d wanted SAM actors", r, len(self.pool.ready()), self.sam_wanted)
        m = self.store.manifest(r)
        prompted = m[m["num_prompts"] > 0]
        cacheable = self.cfg.generalist.backend == "sam" and self.cfg.generalist.cache_embeddings
        return {
            "cases": int(m["case_id"].nunique()),
            "slices": len(m),
            "prompted_slices": len(prompted),
            "cached_slices": int(prompted["embedding_cached"].sum()),
            "cacheable": cacheable,
            "score_mean": float(prompted["score_mean"].mean()) if len(prompted) else float("nan"),
            "agreement_dice": float(prompted["agreement_dice"].mean()) if len(prompted) else float("nan"),
            "ensemble": self.cfg.prompts.ensemble,
            "fg_uncertainty": float(prompted["fg_uncertainty"].mean()) if len(prompted) else float("nan"),
            "failed_cases": failed,
            "workers_ready": len(self.pool.ready()),
            "relabeled_now": len(todo) - len(failed),
            "class_source": {str(c): v for c, v in sources.items()} if sources else {},
            "class_source_evidence": {str(c): v for c, v in evidence.items()},
        }

    def _class_sources(self, r: int, checkpoint_version: int) -> tuple[dict[int, str] | None, dict]:
        """The round's class sources and the numbers they rest on (``pipeline.class_source``). For ``auto``
        the trainer scores both sources on the selection cases with checkpoint ``checkpoint_version``; the
        table is kept in ``selection/round_RRR.parquet`` (with the checkpoint's SHA-256) so that a resumed
        round decides the same way, and recomputed when that checkpoint changed."""
        ids = self.info.foreground_classes
        configured = configured_sources(self.cfg.generalist.class_source, ids)
        if set(configured.values()) == {"generalist"}:
            return None, {}
        table = None
        if "auto" in configured.values():
            sha = self.state["checkpoints"].get(str(checkpoint_version), "")
            path = self.cfg.run_dir / "selection" / f"round_{r:03d}.parquet"
            if path.exists():
                table = read_table(path)
                if table.empty or set(table["checkpoint_sha256"]) != {sha}:
                    table = None
            if table is None:
                table = self._trainer_call(f"scoring class sources for round {r}", "select_sources", r,
                                           self.split.selection)
                table["checkpoint_sha256"] = sha
                write_table(table, path)
        sources, evidence = decide(configured, table, self.cfg.generalist.auto_min_gain)
        log.info("round %d class sources: %s", r, describe_sources(sources, evidence, self.info.labels))
        return sources, evidence

    def worker_stats(self, timeout_s: float = STATS_TIMEOUT_S) -> list[dict]:
        """The counters (``SamWorker.stats``) of every live SAM actor that answers within ``timeout_s``. One
        that was never placed, is gone or does not answer in time is named in one warning and left out, so
        a run that finished its rounds always gets past this and exits."""
        if self.pool is None:
            return []
        members = self.pool.alive()
        refs = [m.handle.stats.remote() for m in members]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        out, missing = [], []
        for m, ref in zip(members, refs, strict=True):
            if ref not in done:
                missing.append(f"{m.label}: no answer within {timeout_s:.0f} s")
                continue
            try:
                out.append(ray.get(ref, timeout=1))
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                missing.append(f"{m.label}: {short_cause(e)}")
        if missing:
            log.warning("worker statistics left out for %d SAM actors (%s)", len(missing), "; ".join(missing))
        return out


def run(cfg: RunConfig, on_event=None) -> list[RoundSummary]:
    """Run (or resume) a whole run; the Ray cluster is started here if none is reachable."""
    return run_with_stats(cfg, on_event)[0]


def run_with_stats(cfg: RunConfig, on_event=None) -> tuple[list[RoundSummary], list[dict]]:
    """:func:`run`, plus each live SAM actor's counters (``SamWorker.stats``: encoder/decoder calls, cache
    hits, seconds), read before the actors are shut down (tests and benchmarks count these)."""
    coordinator = Coordinator(cfg, on_event)
    try:
        summaries = coordinator.run()
        return summaries, coordinator.worker_stats()
    finally:
        coordinator.shutdown()
