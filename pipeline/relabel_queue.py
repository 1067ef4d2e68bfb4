"""One relabel round's work queue over the SAM pool: dispatch, collect, requeue or give up, flush.

Whole cases go to the SAM actors in tasks of ``workers.sam.cases_per_task`` cases, ``CALLS_PER_ACTOR``
calls queued per ready actor (one running, one waiting, so an actor never idles between cases). As calls
return, their manifest rows are appended to the store every ``MANIFEST_FLUSH_SECONDS`` (and at the end,
and when anything stops the round: what is finished is kept). A call whose actor died goes back to the
queue; a case that keeps failing is given up after ``faults.case_attempts`` tries. An actor whose call
runs past the deadline and that no longer answers heartbeats (:class:`pipeline.pool.HangWatch`) is
declared hung: named, killed (Ray restarts it) and its cases re-queued. A storage error (full disk,
storage down) stops the round: it is resumable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.errors import HungError, PlacementError, StoreError, WorkerError
from pipeline.interrupt import POLL_SECONDS, StopFlag
from pipeline.placement import describe, request_of
from pipeline.pool import SILENT_SECONDS, HangWatch, SamPool, kill_actor, short_cause, task_error_cause
from pipeline.progress import Progress
from pipeline.trainer_client import cpu_gpu

log = logging.getLogger(__name__)

# How often finished cases are appended to the manifest during a relabel round. Each append is one new
# part file; a crash loses at most the cases of the last interval, which a resume redoes.
MANIFEST_FLUSH_SECONDS = 10.0
# Calls queued per ready SAM actor (one running, one waiting, so an actor never idles between cases).
CALLS_PER_ACTOR = 2


class RelabelQueue:
    """The cases of round ``r`` still to relabel, and the calls in flight.

    ``spec``: the arguments every ``SamWorker.relabel`` call takes after (cases, round); ``append`` writes
    manifest rows (``PseudoLabelStore.append_manifest``); ``on_done(cases, member_index)`` is told of each
    returned task (progress events)."""

    def __init__(self, r: int, cases: list[str], pool: SamPool, hang_watch: HangWatch, workers_cfg, spec: tuple,
                 append: Callable[[list[dict]], None], stop: StopFlag,
                 on_done: Callable[[list[str], int], None] = lambda cases, member: None):
        self.r, self.pool, self.hang_watch, self.spec = r, pool, hang_watch, spec
        self.faults, self.sam_resources = workers_cfg.faults, workers_cfg.sam
        self.append, self.stop, self.on_done = append, stop, on_done
        k = workers_cfg.sam.cases_per_task
        self.queue = [cases[i:i + k] for i in range(0, len(cases), k)]
        self.attempts: dict[str, int] = {}
        self.failed: dict[str, str] = {}   # case -> why it was given up
        self.in_flight: dict = {}          # ref -> (member, cases)
        self.pending: list[dict] = []      # manifest rows not yet appended
        self.last_flush = time.monotonic()
        self.no_worker_since: float | None = None
        self.progress = Progress(f"relabel round {r}", len(cases), "cases", log)

    def run(self) -> dict[str, str]:
        """Relabel every queued case; returns the cases given up {case: why}. Rows of finished cases are in
        the manifest when this returns or raises (a failed final append is logged, a resume redoes them)."""
        try:
            while self.queue or self.in_flight:
                self.stop.check()
                self.dispatch()
                self.requeue_hung()
                self.check_workers()
                self.collect()
                if self.pending and (not self.in_flight or time.monotonic() - self.last_flush > MANIFEST_FLUSH_SECONDS):
                    self.flush()
        except BaseException as first:  # also when interrupted: what is finished is kept
            self._flush_after(first)
            raise
        self.flush()
        return self.failed

    # -- the steps -----------------------------------------------------------------------------------
    def dispatch(self) -> None:
        """Fill every ready actor up to ``CALLS_PER_ACTOR`` calls."""
        for m in self.pool.ready():
            busy = sum(1 for mm, _ in self.in_flight.values() if mm is m)
            while self.queue and busy < CALLS_PER_ACTOR:
                cases = self.queue.pop(0)
                self.in_flight[m.handle.relabel.remote(cases, self.r, *self.spec)] = (m, cases)
                self.hang_watch.submitted(m, was_idle=busy == 0)
                busy += 1

    def requeue_hung(self) -> None:
        """Kill each hung actor (Ray restarts it) and put its cases back."""
        for m, seconds in self.hang_watch.hung(self.pool.members):
            held = [ref for ref, (mm, _) in self.in_flight.items() if mm is m]
            log.error("round %d: %s has not returned a call for %.0f s (deadline %.0f s: max(%.0f s, %g x the "
                      "median call; workers.faults.hung_after_s, hung_factor)) and has not answered alive() for "
                      "%.0f s: declared hung, killed and restarted; its cases go back to the queue", self.r, m.label,
                      seconds, self.hang_watch.deadline(), self.faults.hung_after_s, self.faults.hung_factor,
                      SILENT_SECONDS)
            kill_actor(m.handle, m.info)
            self.hang_watch.forget(m)
            self.pool.lost(m, HungError(f"no answer for {seconds:.0f} s"))
            for i, ref in enumerate(held):  # calls run in order: only the first was running
                self.give_back(self.in_flight.pop(ref)[1], f"{m.label} hung ({seconds:.0f} s without an answer)",
                               count=i == 0)

    def check_workers(self) -> None:
        """With nothing in flight: some actor must be alive, and one must become ready in time."""
        if self.in_flight:
            self.no_worker_since = None
            return
        if not self.pool.alive():
            raise PlacementError(f"round {self.r}: every SAM actor is gone ({len(self.queue)} tasks left); "
                                 "the cluster cannot place the pool any more")
        self.no_worker_since = self.no_worker_since or time.monotonic()
        if time.monotonic() - self.no_worker_since > self.faults.placement_timeout_s:
            raise PlacementError(
                f"round {self.r}: no SAM actor has been ready for {self.faults.placement_timeout_s:.0f} s "
                f"(each asks for {describe(request_of(self.sam_resources))}; free now: "
                f"{describe(cpu_gpu(ray.available_resources()))})")

    def collect(self) -> None:
        """Wait up to POLL_SECONDS for a returned call or an actor's ready() answer, and take it in."""
        refs = list(self.in_flight) + self.pool.pings()
        if not refs:
            time.sleep(POLL_SECONDS)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
        for ref in ready:
            member = self.pool.owner_of_ping(ref)
            if member is not None:
                self.pool.resolve_ping(member)
            elif ref in self.in_flight:  # else a call of an actor declared hung: its cases went back already
                self.take(ref)

    def take(self, ref) -> None:
        """One returned call: its rows are kept, its failed cases and a dead actor's cases go back."""
        m, cases = self.in_flight.pop(ref)
        self.hang_watch.returned(m, more_queued=any(mm is m for mm, _ in self.in_flight.values()))
        try:
            result = ray.get(ref)
        except RayTaskError as e:
            if isinstance(task_error_cause(e), StoreError):  # storage failed or full: stop, resumable
                raise task_error_cause(e) from None
            self.give_back(cases, f"{m.label}: {short_cause(e)}")
            return
        except RayActorError as e:
            self.hang_watch.forget(m)
            self.pool.lost(m, e)
            self.give_back(cases, f"{m.label} died: {short_cause(e)}")
            return
        self.pending.extend(result["rows"])
        for c, why in result["failed"].items():
            log.warning("round %d: %s failed on case %s: %s", self.r, m.label, c, why)
            self.give_back([c], f"{m.label}: {why}")
        self.progress.advance(len(cases) - len(result["failed"]), extra=f"{len(self.pool.ready())} SAM actors")
        self.on_done(cases, m.index)

    def give_back(self, cases: list[str], why: str, count: bool = True) -> None:
        """Queue ``cases`` again, each alone; one that has used its ``faults.case_attempts`` is given up."""
        for c in cases:
            self.attempts[c] = self.attempts.get(c, 0) + (1 if count else 0)
            if self.attempts[c] >= self.faults.case_attempts:
                self.failed[c] = why
                log.error("round %d: giving up on case %s after %d tries: %s", self.r, c, self.attempts[c], why)
                self.progress.advance(1)
            else:
                self.queue.append([c])

    def flush(self) -> None:
        if self.pending:
            self.append(self.pending)
        self.pending, self.last_flush = [], time.monotonic()

    def _flush_after(self, first: BaseException) -> None:
        """Keep what is finished after ``first`` stopped the round; never raise over it."""
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - a resume redoes them
            log.warning("round %d: the last %d finished cases could not be added to the manifest (%s); a resume "
                        "redoes them", self.r, len({row["case_id"] for row in self.pending}), short_cause(e))


def check_failures(r: int, failed: dict[str, str], num_unlabeled: int, max_failed_fraction: float) -> None:
    """Given-up cases are tolerated up to ``max_failed_fraction`` of the unlabeled cases (a warning), and
    stop the run beyond it (WorkerError naming the first few)."""
    if not failed:
        return
    msg = f"round {r}: gave up on {len(failed)} of {num_unlabeled} cases"
    if len(failed) / max(1, num_unlabeled) > max_failed_fraction:
        first = "; ".join(f"{c}: {w}" for c, w in list(failed.items())[:3])
        raise WorkerError(f"{msg} (more than workers.faults.max_failed_fraction={max_failed_fraction}); first: {first}")
    log.warning("%s; training goes on without them", msg)
