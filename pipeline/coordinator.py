"""The coordinator: alternates relabeling rounds and training rounds on Ray, survives faults, resumes runs.

    round 0:   train (no pseudo-labels)                      -> checkpoint 0 -> evaluate
    round r>0: relabel unlabeled cases with checkpoint r-1   -> store round r
               train with the round-r pseudo-labels          -> checkpoint r -> evaluate

Evaluate: on the validation split, when the run has one (every round; ``eval/val_round_NNN.parquet``; the
best round by validation Dice goes to state.json's ``best``, which ``semisam predict --round best`` takes),
and on the test split (``eval.every_round``; ``eval/round_NNN.parquet``). Test labels choose nothing.

With the pseudo-label term off (``train.pseudo_label.enabled: false`` or weight 0, e.g. plain Mean
Teacher) no SAM pool is started and every round only trains.

The coordinator is given its actor classes (:class:`Actors`; ``semisam.launch`` gives the project's
``workers.trainer.TrainerWorker`` and ``workers.sam_worker.SamWorker``), so the library never imports
the actors. Its parts: the run folder (:mod:`pipeline.run_folder`), what of it stands on a resume
(:mod:`pipeline.resume`), the trainer's calls (:mod:`pipeline.trainer_client`), a relabel round's work
queue (:mod:`pipeline.relabel_queue`) and the round summary (:mod:`pipeline.round_summary`).

What survives what (docs/faults.md has the table): a SAM actor that dies, or hangs, has its cases re-queued
to any live actor (``faults.case_attempts`` tries per case); a trainer that dies or hangs is restarted by
Ray and restores the newest published checkpoint: a round's training and its publication are redone
together, an evaluation is redone on the round's own checkpoint; a lost node is the same path; a killed
driver resumes after the last completed round (a checkpoint it had already published is evaluated, not
retrained), and inside a relabel round only cases that are not both in the manifest and in the arrays,
readable and made by the current checkpoint, are redone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import pandas as pd
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from pipeline.class_source import configured_sources, decide
from pipeline.class_source import describe as describe_sources
from pipeline.config import RunConfig, with_absolute_paths
from pipeline.errors import PlacementError, StoreError
from pipeline.evaluation import audit_means, audit_pseudo_labels, round_means
from pipeline.events import EventLog, round_scalars
from pipeline.generalist.adapt import decoder_sha, forget_stale_decoder
from pipeline.generalist.factory import caches_embeddings, generalist_name
from pipeline.interrupt import StopFlag
from pipeline.oracle import BANNER, check_unlocked, is_oracle, state_mark
from pipeline.overlap import SideBySide
from pipeline.placement import plan_pool
from pipeline.pool import DEAD, HangWatch, SamPool, short_cause
from pipeline.preflight import check_not_in_job_package, preflight  # noqa: F401 - part of this module's API
from pipeline.ray_runtime import init_ray, remote_actor
from pipeline.relabel_queue import RelabelQueue, check_failures
from pipeline.resume import (  # noqa: F401 - prepare_run_dir, RESUMABLE_CHANGES: part of this module's API
    RESUMABLE_CHANGES,
    check_chain,
    forget_checkpoints_from,
    invalid_cases,
    lost_cases,
    newest_published,
    prepare_run_dir,
    warm_start,
)
from pipeline.round_summary import RoundSummary, best_round, relabel_stats
from pipeline.run_folder import RunFolder
from pipeline.run_lock import RunLock
from pipeline.storage import read_table, write_table
from pipeline.store import PseudoLabelStore
from pipeline.trainer_client import TrainerClient

log = logging.getLogger(__name__)

# How long the driver waits for the SAM actors' counters at the end of a run (they are only statistics).
STATS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Actors:
    """The actor classes a coordinator starts (plain classes; made remote here).

    ``trainer(cfg_dict)``: ready, train_round, publish, restore, weights, model_args, evaluate,
    select_sources, alive (see ``workers.trainer.TrainerWorker``). ``sam(cfg_dict, index)``: ready,
    relabel, stats, alive (see ``workers.sam_worker.SamWorker``)."""

    trainer: type
    sam: type


class Coordinator:
    """Owns the actors of one run and drives its rounds. Holds the run folder's lock while it lives."""

    def __init__(self, cfg: RunConfig, actors: Actors, on_event=None, stop: StopFlag | None = None,
                 leak_labels: bool = False):
        """``on_event(name, coordinator, **details)``: called at round/task boundaries (progress, tests).
        ``stop``: the StopFlag the caller installed before anything started (the CLI does, so a Ctrl-C in
        preflight, Ray's start-up or placement is seen too: it is checked after each of them).
        ``leak_labels``: unlocks an oracle config (``prompts.source: oracle_labels_LEAK``,
        :mod:`pipeline.oracle`); without it such a config is refused here, before anything runs."""
        check_unlocked(cfg, leak_labels)
        self.leak_labels = leak_labels
        self.cfg = cfg = with_absolute_paths(cfg)
        self.actors = actors
        self.on_event = on_event or (lambda *a, **k: None)
        self.stop = stop or StopFlag()
        cfg, self.info, self.split = preflight(cfg)  # the config may gain data.labels (see preflight)
        self.stop.check()
        self.cfg = cfg
        self.folder = RunFolder(cfg.run_dir)
        self.faults = cfg.workers.faults
        self.lock = RunLock(cfg.run_dir, self.faults.lock_stale_s).acquire()
        self._started_ray = False
        self.trainer_client: TrainerClient | None = None
        self.pool: SamPool | None = None
        self.hang_watch = HangWatch(cfg.workers.faults.hung_after_s, cfg.workers.faults.hung_factor)
        try:
            self.stop.check()
            self.cfg, self.state = prepare_run_dir(self.cfg)
            if is_oracle(self.cfg):
                log.warning(BANNER)
                self.state["oracle"] = state_mark()
                self.folder.save_state(self.state)
            self.events = EventLog(cfg.run_dir, "rounds")  # TensorBoard: tensorboard --logdir <run folder>/tb
            self.store = PseudoLabelStore(self.folder.pseudo_labels, create=True,
                                          class_ids=self.info.foreground_classes, slice_axis=cfg.data.slice_axis)
            # Without the pseudo-label term there is nothing to relabel: no SAM pool, rounds only train.
            self.relabels = bool(self.split.unlabeled) and cfg.train.pseudo_label.active
            self.stop.check()
            self._started_ray = init_ray(cfg.workers)
            self.stop.reclaim()  # Ray's native SIGTERM handler aborts the driver; ours is put back
            self.stop.check()
            self._place_actors()
        except BaseException:
            self.shutdown()
            raise

    # -- the trainer, for callers and tests ------------------------------------------------------------
    @property
    def trainer(self):
        """The trainer actor's handle (it changes when a lost trainer is replaced)."""
        return self.trainer_client.handle

    @property
    def trainer_info(self) -> dict:
        return self.trainer_client.info

    @property
    def trainer_restarts(self) -> int:
        return self.trainer_client.restarts

    # -- actors ----------------------------------------------------------------------------------
    def _remote(self, cls, resources):
        # an actor with ``alive`` answers it from a thread of its own while a long call runs (hang detection)
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
        trainer = self._remote(self.actors.trainer, w.trainer)
        self.trainer_client = TrainerClient(lambda: trainer.remote(cfg_dict), self.lock.token, self.faults,
                                            w.trainer, self.stop, lambda: newest_published(self.state))
        if self.relabels:
            sam = self._remote(self.actors.sam, w.sam)
            self.pool = SamPool(lambda i: sam.remote(cfg_dict, i, self.leak_labels), self.lock.token)
            self.pool.grow(self.sam_wanted)
        self.trainer_client.await_ready()

    def _restore(self, version: int, stop=None) -> None:
        """Load published checkpoint ``version`` into the trainer (its recorded SHA-256 is checked)."""
        self.trainer_client.call(f"restoring checkpoint {version}", "restore", version,
                                 self.state["checkpoints"].get(str(version)), stop=stop)

    def shutdown(self) -> None:
        try:
            if self.trainer_client is not None:
                self.trainer_client.kill()
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
    def run(self) -> list[RoundSummary]:
        with self.stop:
            if self.cfg.train.init_from and 0 not in self.state["completed"]:
                warm_start(self.cfg, self.state)
            if self.relabels:
                forget_stale_decoder(self.folder, self.state)
            completed = check_chain(self.folder, self.state, self.store if self.relabels else None)
            if completed:
                self._repair_completed(completed)
                self._restore(completed[-1])
                log.info("resuming %s after round %d", self.cfg.run_dir, completed[-1])
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
                self.state["best"] = best_round(self.state["summaries"])
                self.folder.save_state(self.state)
                self.on_event("round_done", self, round=r)
            return summaries

    def run_round(self, r: int) -> RoundSummary:
        start = time.perf_counter()
        summary = RoundSummary(round=r, seconds=0.0)
        if r > 0 and self.relabels and self.cfg.workers.overlap:
            self._overlapped_round(r, summary)
        else:
            pseudo_cases = self._relabel_and_audit(r, summary) if r > 0 and self.relabels else None
            self._train(r, summary, r if pseudo_cases else None, pseudo_cases,
                        reuse_published=summary.relabel.get("relabeled_now", 0) == 0)
        self.on_event("published", self, round=r)
        start_eval = time.perf_counter()
        if self.split.val:  # every round: the validation Dice chooses the best round (state.json "best")
            summary.val = round_means(self.trainer_client.call(f"validating round {r}", "evaluate", r, "val"))
        if self.split.test and (self.cfg.eval.every_round or r == self.cfg.rounds - 1):
            summary.test = round_means(self.trainer_client.call(
                f"evaluating round {r}", "evaluate", r, progress=f"{len(self.split.test)} test cases"))
        if summary.val or summary.test:
            summary.timing["eval_s"] = round(time.perf_counter() - start_eval, 3)
        summary.seconds = time.perf_counter() - start
        return summary

    def _relabel_and_audit(self, r: int, summary: RoundSummary, stop=None, on_ready=None) -> list[str]:
        """Relabel store ``r`` with checkpoint ``r - 1`` (and audit it when asked); returns its cases."""
        start = time.perf_counter()
        summary.relabel = self.relabel_round(r, r - 1, stop=stop, on_ready=on_ready)
        cases = sorted(self.store.completed_cases(r))
        if self.cfg.eval.audit_pseudo_labels and cases:
            audit = audit_pseudo_labels(self.store, self.info, r, cases, self.info.foreground_classes)
            write_table(audit, self.folder.table("audit", r))
            summary.audit = audit_means(audit)
        summary.timing["relabel_s"] = round(time.perf_counter() - start, 3)
        return cases

    def _overlapped_round(self, r: int, summary: RoundSummary) -> None:
        """Round ``r`` with ``workers.overlap`` (:mod:`pipeline.overlap`): train on store ``r - 1`` (none in
        round 1) while the pool relabels store ``r`` for round ``r + 1`` (not in the last round)."""
        train_on = r - 1 if r >= 2 else None
        cases = sorted(self.store.completed_cases(train_on)) if train_on is not None else []

        def train(stop) -> None:
            self._train(r, summary, train_on if cases else None, cases or None, reuse_published=True, stop=stop)
            summary.train["pseudo_round"] = train_on if cases else -1

        if r == self.cfg.rounds - 1:
            train(self.stop)
            return
        side = SideBySide(self.stop)
        side.run(lambda stop: self._relabel_and_audit(r, summary, stop, on_ready=lambda: side.start_training(train)))
        summary.relabel["trained_in_round"] = r + 1

    def _train(self, r: int, summary: RoundSummary, pseudo_round: int | None, pseudo_cases: list[str] | None,
               reuse_published: bool, stop=None) -> None:
        """Train round ``r`` and publish checkpoint ``r``. ``reuse_published``: a checkpoint ``r`` published
        before the driver was stopped was trained on the same pseudo-labels; it is used instead (restored,
        not retrained)."""
        start = time.perf_counter()
        try:
            self._train_or_reuse(r, summary, pseudo_round, pseudo_cases, reuse_published, stop)
        finally:
            summary.timing["train_s"] = round(time.perf_counter() - start, 3)

    def _train_or_reuse(self, r: int, summary: RoundSummary, pseudo_round: int | None, pseudo_cases: list[str] | None,
                        reuse_published: bool, stop) -> None:
        published = self.state["checkpoints"].get(str(r))
        if published and reuse_published:
            self._restore(r, stop)
            summary.train = dict(self.state.get("train_stats", {}).get(str(r), {}))
            log.info("round %d: checkpoint %d was published before the interruption; it is used, not retrained", r, r)
            return
        forget_checkpoints_from(self.state, r)
        self.on_event("train_start", self, round=r)
        summary.train, sha = self.trainer_client.train_and_publish(r, pseudo_round, pseudo_cases, stop)
        self.state["checkpoints"][str(r)] = sha
        self.state.setdefault("train_stats", {})[str(r)] = summary.train
        self.folder.save_state(self.state)

    # -- relabeling ------------------------------------------------------------------------------
    def _todo(self, r: int) -> list[str]:
        """Unlabeled cases not yet (validly) done in round ``r`` (see :func:`pipeline.resume.invalid_cases`);
        a case with arrays but no rows is simply redone (its arrays are replaced whole)."""
        invalid_cases(self.store, self.state, r)
        done = self.store.completed_cases(r)
        todo = [c for c in self.split.unlabeled if c not in done]
        if done:
            log.info("round %d: %d cases already relabeled, %d to go", r, len(done), len(todo))
        return todo

    def _repair_completed(self, completed: list[int]) -> None:
        """Redo the cases of completed relabel rounds that cannot be used with the checkpoint that made
        them, so the record is whole again, both ways: rows whose arrays are missing, damaged or stale
        (``invalid_cases``), and unlabeled cases without rows (``lost_cases``, e.g. a deleted manifest part).
        The rounds' training is not redone (it used the cases before they were lost). Given-up cases stay
        given up."""
        if not self.relabels:
            return
        for r in (r for r in completed if r > 0):
            redo = sorted(invalid_cases(self.store, self.state, r)
                          | lost_cases(self.store, self.state, r, self.split.unlabeled))
            if redo:
                log.info("round %d is completed; relabeling %d of its cases again with checkpoint %d", r,
                         len(redo), r - 1)
                self._restore(r - 1)
                self.relabel_round(r, r - 1, cases=redo)

    def relabel_round(self, r: int, checkpoint_version: int, cases: list[str] | None = None, stop=None,
                      on_ready=None) -> dict:
        """Relabel round ``r`` with checkpoint ``checkpoint_version`` through the SAM pool
        (:class:`pipeline.relabel_queue.RelabelQueue`); returns the round's relabel statistics.
        ``cases``: only these (a repair); default every case not yet done. ``on_ready()``: called once the
        trainer has handed over what the round needs from it (an overlapped round starts training then);
        ``stop``: what the queue polls (default the run's StopFlag)."""
        assert self.pool is not None
        self.store.ensure_round(r, checkpoint_version, generalist_name(self.cfg.generalist))
        self._ensure_adapted(stop or self.stop)
        todo = self._todo(r) if cases is None else list(cases)
        sources, evidence = self._class_sources(r, checkpoint_version) if todo else (None, {})
        added = self.pool.grow(self.sam_wanted)
        if added:
            log.info("round %d: started %d more SAM actors (pool of %d wanted)", r, added, self.sam_wanted)
        trained_in = r + 1 if self.cfg.workers.overlap else r  # overlapped: used one round later

        def append(rows: list[dict]) -> None:
            self.store.append_manifest([{**row, "trained_in_round": trained_in} for row in rows])

        queue = RelabelQueue(r, todo, self.pool, self.hang_watch, self.cfg.workers,
                             self._relabel_spec(checkpoint_version, sources), append, stop or self.stop,
                             lambda done, member: self.on_event("task_done", self, round=r, cases=done, member=member))
        if on_ready is not None:
            on_ready()
        failed = queue.run()
        check_failures(r, failed, len(self.split.unlabeled), self.faults.max_failed_fraction)
        dead = [m for m in self.pool.members if m.state == DEAD]
        if todo and (dead or len(self.pool.ready()) < self.sam_wanted):  # a round with nothing to do used no actor
            log.warning("round %d ran with %d of %d wanted SAM actors", r, len(self.pool.ready()), self.sam_wanted)
        return {
            **relabel_stats(self.store.manifest(r)),
            "cacheable": caches_embeddings(self.cfg.generalist),
            "ensemble": self.cfg.prompts.ensemble,
            "failed_cases": failed,
            "workers_ready": len(self.pool.ready()),
            "relabeled_now": len(todo) - len(failed),
            "class_source": {str(c): v for c, v in sources.items()} if sources else {},
            "class_source_evidence": {str(c): v for c, v in evidence.items()},
        }

    def _relabel_spec(self, checkpoint_version: int, sources) -> tuple:
        """The arguments of every ``relabel`` call after (cases, round): the checkpoint's version, model
        args, weights and SHA-256, and the class sources. The specialist travels through the object store
        once; actors fetch it when their version or SHA differs (also after a restart). The driver owns the
        object, so it outlives a trainer that dies; wrapped in a list so Ray passes the reference."""
        weights_ref = ray.put(self.trainer_client.call("sharing weights", "weights", checkpoint_version))
        sha = self.state["checkpoints"][str(checkpoint_version)]
        model_args = self.trainer_client.call("sharing model args", "model_args")
        return checkpoint_version, model_args, [weights_ref], sources, sha, decoder_sha(self.state)

    def _ensure_adapted(self, stop) -> None:
        """With ``generalist.adapt``: the run's adapted decoder, fitted now by a SAM actor unless state.json
        records one whose file still has its SHA-256 (:mod:`pipeline.generalist.adapt`). A lost actor is
        replaced and asked again (``faults.case_attempts`` tries)."""
        if not self.cfg.generalist.adapt.enabled or decoder_sha(self.state):
            return
        for attempt in range(1, self.faults.case_attempts + 1):
            members = self.pool.alive()
            if not members:
                raise PlacementError("no SAM actor is alive to fit the adapted decoder (generalist.adapt)")
            m = members[0]
            log.info("fitting the adapted decoder on the labeled cases (%s, attempt %d)", m.label, attempt)
            ref = m.handle.fit_adapted.remote()
            while not ray.wait([ref], timeout=1.0)[0]:
                stop.check()
            try:
                out = ray.get(ref)
                break
            except RayActorError as e:
                self.pool.lost(m, e)
                if attempt == self.faults.case_attempts:
                    raise
        self.state["adapted_decoder"] = {"sha256": out["sha256"], "stats": out["stats"]}
        self.folder.save_state(self.state)
        log.info("adapted decoder %s... (%s)", out["sha256"][:12], out["stats"])

    def _class_sources(self, r: int, checkpoint_version: int) -> tuple[dict[int, str] | None, dict]:
        """The round's class sources and the numbers they rest on (``pipeline.class_source``). For ``auto``
        the trainer scores both sources on the selection cases with checkpoint ``checkpoint_version``; the
        table is kept in ``selection/round_RRR.parquet`` (with the checkpoint's SHA-256) so that a resumed
        round decides the same way, and recomputed when that checkpoint changed."""
        configured = configured_sources(self.cfg.generalist.class_source, self.info.foreground_classes)
        if set(configured.values()) == {"generalist"}:
            return None, {}
        table = None
        if "auto" in configured.values():
            sha = self.state["checkpoints"].get(str(checkpoint_version), "")
            loc = self.folder.table("selection", r)
            if loc.exists():
                try:
                    table = read_table(loc)
                except StoreError as e:  # damaged: scored again and rewritten
                    log.warning("%s; scoring the class sources again", str(e).split(";")[0])
                    table = None
                if table is not None:
                    made_with = table.get("decoder_sha256", pd.Series([""] * len(table)))
                    if (table.empty or set(table["checkpoint_sha256"]) != {sha}
                            or set(made_with) != {decoder_sha(self.state)}):
                        table = None
            if table is None:
                table = self.trainer_client.call(f"scoring class sources for round {r}", "select_sources", r,
                                                 self.split.selection, decoder_sha(self.state),
                                                 progress=f"{len(self.split.selection)} selection cases, generalist "
                                                          "and specialist")
                table["checkpoint_sha256"] = sha
                table["decoder_sha256"] = decoder_sha(self.state)
                write_table(table, loc)
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


def run(cfg: RunConfig, actors: Actors, on_event=None, stop: StopFlag | None = None, *,
        leak_labels: bool = False) -> list[RoundSummary]:
    """Run (or resume) a whole run; the Ray cluster is started here if none is reachable. ``leak_labels``:
    see :class:`Coordinator` (the oracle control only)."""
    return run_with_stats(cfg, actors, on_event, stop, leak_labels=leak_labels)[0]


def run_with_stats(cfg: RunConfig, actors: Actors, on_event=None, stop: StopFlag | None = None, *,
                   leak_labels: bool = False) -> tuple[list[RoundSummary], list[dict]]:
    """:func:`run`, plus each live SAM actor's counters (``SamWorker.stats``: encoder/decoder calls, cache
    hits, seconds), read before the actors are shut down (tests and benchmarks count these)."""
    coordinator = Coordinator(cfg, actors, on_event, stop, leak_labels)
    try:
        summaries = coordinator.run()
        return summaries, coordinator.worker_stats()
    finally:
        coordinator.shutdown()
