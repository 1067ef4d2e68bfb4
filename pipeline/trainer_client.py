"""The driver's side of the trainer actor: calls that survive a trainer that dies or hangs.

A trainer lost in a call (its process died, its node went away, or it stopped answering heartbeats and
was killed) is restarted by Ray (``workers.faults.actor_restarts``), or started anew; it then restores
the newest *published* checkpoint and the call is made again, ``workers.faults.trainer_attempts`` tries
in all. An error the trainer raises itself is final (a SemisamError as is, anything else a WorkerError).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from pipeline.errors import HungError, PlacementError, SemisamError, WorkerError
from pipeline.interrupt import POLL_SECONDS, StopFlag
from pipeline.placement import describe, request_of
from pipeline.pool import HEARTBEAT_SECONDS, creation_failed, kill_actor, short_cause, task_error_cause

log = logging.getLogger(__name__)


class TrainerLost(Exception):
    """The trainer died or hung during a call (turned into a restart, or a WorkerError)."""


def cpu_gpu(resources: dict) -> dict:
    """Resources worth naming to a user (no per-node markers, no memory byte counts)."""
    return {k: v for k, v in resources.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}


STILL_EVERY_S = 10.0
"""How often a long trainer call that reports no progress of its own (evaluation, class-source scoring) is
said to be still running."""


def wait_for(ref, stop, deadline: float | None = None, watch=None, hung_after_s: float = float("inf"),
             still: Callable[[float], None] | None = None):
    """``ray.get`` that wakes every POLL_SECONDS to ``stop.check()`` (Ctrl-C/SIGTERM: a StopFlag, or a
    :class:`pipeline.overlap.LinkedStop`); GetTimeoutError past ``deadline``.

    ``watch`` (an actor handle with an ``alive`` method in its own concurrency group): while waiting, the
    actor is asked ``alive()`` every ``HEARTBEAT_SECONDS``; one that has not answered for ``hung_after_s``
    is declared hung (HungError): a stopped or wedged process never answers, a busy one does (from its
    own thread). ``still(seconds)``: called every ``STILL_EVERY_S`` while waiting (a progress line)."""
    beat, beat_sent, last_answer = None, 0.0, time.monotonic()
    started = said = time.monotonic()
    while True:
        stop.check()
        ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
        if ready:
            return ray.get(ref)
        now = time.monotonic()
        if still is not None and now - said >= STILL_EVERY_S:
            said = now
            still(now - started)
        if deadline is not None and now > deadline:
            raise GetTimeoutError("deadline passed")
        if watch is None:
            continue
        if beat is not None and ray.wait([beat], timeout=0)[0]:
            beat, last_answer = None, now
        if beat is None and now - beat_sent >= HEARTBEAT_SECONDS:
            beat, beat_sent = watch.alive.remote(), now
        if now - last_answer > hung_after_s:
            raise HungError(f"no answer to a heartbeat for {now - last_answer:.0f} s "
                            f"(workers.faults.hung_after_s={hung_after_s:.0f})")


class TrainerClient:
    """Makes, calls and revives the trainer actor.

    Every call waits on ``stop`` (default the run's StopFlag; an overlapped round passes its own, see
    :mod:`pipeline.overlap`). ``make()`` starts a new trainer actor; ``token`` is the run lock's (the trainer checks it);
    ``newest_published()`` gives (version, SHA-256) of the newest published checkpoint, or None, for the
    restore after a loss."""

    def __init__(self, make: Callable[[], object], token: str, faults, resources, stop: StopFlag,
                 newest_published: Callable[[], tuple[int, str] | None]):
        self.make, self.token, self.faults, self.resources, self.stop = make, token, faults, resources, stop
        self.newest_published = newest_published
        self.handle = make()
        self.info: dict = {}
        self.restarts = 0

    def await_ready(self, stop=None) -> None:
        """Wait until the trainer answers (placed, data loaded, sees the run folder)."""
        deadline = time.monotonic() + self.faults.placement_timeout_s
        while True:
            try:
                self.info = wait_for(self.handle.ready.remote(self.token), stop or self.stop, deadline=deadline)
                log.info("trainer ready on %s (pid %s, GPUs %s)", self.info.get("host"), self.info.get("pid"),
                         self.info.get("gpu_ids") or "none")
                return
            except GetTimeoutError:
                raise PlacementError(
                    f"the trainer ({describe(request_of(self.resources))}) did not answer within "
                    f"{self.faults.placement_timeout_s:.0f} s (workers.faults.placement_timeout_s): either the "
                    f"cluster cannot place it (free now: {describe(cpu_gpu(ray.available_resources()))}; free or "
                    "add resources) or loading its data takes longer (raise the timeout)") from None
            except RayActorError as e:
                if isinstance(e, ActorDiedError) and creation_failed(e):
                    raise WorkerError(f"the trainer could not start: {short_cause(e)}") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"the trainer did not come back: {short_cause(e)}") from None
                time.sleep(0.5)  # restarting: ask again

    def once(self, what: str, method: str, *args, stop=None, progress: str = ""):
        """One call. An error the method raises is final; a trainer that dies or hangs (then killed: Ray
        restarts it) raises TrainerLost. ``progress``: said with the seconds so far every ``STILL_EVERY_S``
        (for calls that log nothing themselves)."""
        def still(seconds: float) -> None:
            log.info("%s: %.0f s so far%s", what, seconds, f" ({progress})" if progress else "")

        try:
            return wait_for(getattr(self.handle, method).remote(*args), stop or self.stop, watch=self.handle,
                            hung_after_s=self.faults.hung_after_s, still=still if progress else None)
        except RayTaskError as e:
            cause = task_error_cause(e)
            if isinstance(cause, SemisamError):
                raise cause from None
            raise WorkerError(f"the trainer failed in {what}: {short_cause(e)}") from None
        except RayActorError as e:
            raise TrainerLost(short_cause(e)) from None
        except HungError as e:
            where = f"pid {self.info.get('pid')} on {self.info.get('host')}"
            log.error("the trainer (%s) is hung in %s: %s; killing it (Ray restarts it)", where, what, e)
            kill_actor(self.handle, self.info)
            raise TrainerLost(f"hung in {what}: {e}") from None

    def call(self, what: str, method: str, *args, stop=None, progress: str = ""):
        """:meth:`once`, made again after the trainer is revived when it was lost."""
        return self.with_retries(what, lambda: self.once(what, method, *args, stop=stop, progress=progress), stop)

    def with_retries(self, what: str, body: Callable[[], object], stop=None):
        """Run ``body`` (trainer calls); if the trainer is lost, revive it and run ``body`` again."""
        for attempt in range(1, self.faults.trainer_attempts + 1):
            try:
                if attempt > 1:
                    self.revive(stop)
                return body()
            except TrainerLost as e:
                if attempt == self.faults.trainer_attempts:
                    raise WorkerError(f"the trainer was lost {attempt} times in {what} (last: {e}); stopping. "
                                      "Rerun to resume after the last completed round") from None
                log.warning("the trainer was lost in %s (%s); restarting it from the newest published checkpoint "
                            "(try %d of %d)", what, e, attempt + 1, self.faults.trainer_attempts)
        raise AssertionError("unreachable")

    def train_and_publish(self, r: int, pseudo_round: int | None, pseudo_cases: list[str] | None,
                          stop=None) -> tuple[dict, str]:
        """Train round ``r`` and publish checkpoint ``r`` as one unit: a trainer lost in either is restored to
        checkpoint ``r - 1`` and trains again, so a checkpoint always holds its own round's training.
        Returns (training statistics, the checkpoint's SHA-256)."""
        def body():
            stats = self.once(f"training round {r}", "train_round", r, pseudo_round, pseudo_cases, stop=stop)
            return stats, self.once(f"publishing checkpoint {r}", "publish", r, stop=stop)
        return self.with_retries(f"training round {r}", body, stop)

    def revive(self, stop=None) -> None:
        """After the trainer died or hung: wait for it (Ray restarts it) or start a new one, then restore the
        newest published checkpoint (the current round's when it was published before the loss)."""
        self.restarts += 1
        try:
            self.await_ready(stop)
        except (WorkerError, PlacementError) as e:
            log.warning("the trainer did not come back (%s); starting a new one", e)
            self.handle = self.make()
            self.await_ready(stop)
        newest = self.newest_published()
        if newest is not None:
            self.once("restoring", "restore", *newest, stop=stop)
            log.info("trainer restored checkpoint %d", newest[0])

    def kill(self) -> None:
        ray.kill(self.handle)
