"""The SAM actor pool as the coordinator sees it: members that start, die, come back, or never come.

Ray restarts a dead actor (``faults.actor_restarts``) on any node that fits; Ray queues an actor it
cannot place, silently. The pool therefore tracks each member by asking it ``ready(token)`` (which also
proves it sees the run folder): a member is *ready* once that answers, *starting* until then, *dead*
once Ray says it will not come back. Work goes only to ready members; the coordinator owns the queue
and re-queues whatever a dead member held. Members that never come up do not block a round: it goes on
with the ready ones (and says so), and fails only when none is ready for ``placement_timeout_s``.
``grow`` adds members up to the wanted size at the start of each relabel round (nodes that joined).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from pipeline.errors import SemisamError, WorkerError

log = logging.getLogger(__name__)

STARTING, READY, DEAD = "starting", "ready", "dead"
# How long to wait before asking a restarting actor again (Ray answers "restarting" meanwhile).
REPING_SECONDS = 0.5


def task_error_cause(err: RayTaskError) -> BaseException:
    """The exception the actor method raised (Ray wraps it)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def short_cause(err: BaseException) -> str:
    """One line for users: the error type and the first line of its message, without Ray's traceback."""
    if isinstance(err, RayTaskError):
        err = task_error_cause(err)
    if isinstance(err, SemisamError):
        return str(err)
    text = str(err).strip().splitlines()
    # Ray's own messages start with boilerplate; keep the line that says why.
    why = next((t for t in text if "Error" in t and "Traceback" not in t), text[0] if text else "")
    return f"{type(err).__name__}: {why.strip()}"[:500]


@dataclass
class Member:
    index: int
    handle: object
    state: str = STARTING
    ping: object | None = None          # the pending ready() call, if any
    reping_at: float = 0.0
    info: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        where = f" on {self.info.get('host')} ({self.info.get('node_id', '')[:8]})" if self.info else ""
        return f"SAM worker {self.index}{where}"


class SamPool:
    """``make(index)`` returns a new actor handle; ``token`` is the run lock's (see pipeline.run_lock)."""

    def __init__(self, make: Callable[[int], object], token: str):
        self.make, self.token = make, token
        self.members: list[Member] = []

    # -- membership ------------------------------------------------------------------------------
    def grow(self, wanted: int) -> int:
        """Start members until ``wanted`` are ready or starting; returns how many were started."""
        live = [m for m in self.members if m.state != DEAD]
        added = 0
        for _ in range(max(0, wanted - len(live))):
            m = Member(len(self.members), self.make(len(self.members)))
            self.members.append(m)
            self._ask(m)
            added += 1
        return added

    def _ask(self, m: Member) -> None:
        m.ping = m.handle.ready.remote(self.token)
        m.reping_at = 0.0

    def ready(self) -> list[Member]:
        return [m for m in self.members if m.state == READY]

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.state != DEAD]

    def pings(self) -> list:
        """Pending ready() calls (to include in ``ray.wait``), after re-asking restarting members."""
        now = time.monotonic()
        for m in self.members:
            if m.state == STARTING and m.ping is None and now >= m.reping_at:
                self._ask(m)
        return [m.ping for m in self.members if m.ping is not None]

    def owner_of_ping(self, ref) -> Member | None:
        return next((m for m in self.members if m.ping is not None and m.ping == ref), None)

    def resolve_ping(self, m: Member) -> None:
        """Read a finished ready() call: the member is ready, restarting (ask again later) or dead."""
        ref, m.ping = m.ping, None
        try:
            m.info = ray.get(ref)
        except ActorUnavailableError:
            m.reping_at = time.monotonic() + REPING_SECONDS
            return
        except RayTaskError as e:  # ready() itself raised: e.g. the actor does not see the run folder
            raise WorkerError(f"SAM worker {m.index}: {short_cause(e)}") from None
        except ActorDiedError as e:
            if creation_failed(e):
                raise WorkerError(f"SAM worker {m.index} could not start: {_creation_cause(e)}") from None
            self.mark_dead(m, short_cause(e))
            return
        except RayActorError:
            m.reping_at = time.monotonic() + REPING_SECONDS
            return
        if m.state != READY:
            log.info("%s is ready (pid %s, GPUs %s)", m.label, m.info.get("pid"), m.info.get("gpu_ids") or "none")
        m.state = READY

    def lost(self, m: Member, err: BaseException) -> None:
        """A call to ``m`` failed because its actor died: Ray may restart it; ask until it answers."""
        if m.state == DEAD:
            return
        log.warning("%s died (%s); its cases go back to the queue", m.label, short_cause(err))
        m.state = STARTING
        m.reping_at = time.monotonic() + REPING_SECONDS
        m.ping = None

    def mark_dead(self, m: Member, why: str) -> None:
        if m.state != DEAD:
            log.warning("%s is gone for good (%s); the round goes on with %d live workers", m.label, why,
                        len(self.alive()) - 1)
        m.state, m.ping = DEAD, None

    def kill(self) -> None:
        for m in self.members:
            try:
                ray.kill(m.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass


def kill_actor(handle, info: dict | None = None) -> None:
    """Kill an actor so that Ray restarts it (``no_restart=False``; counts against ``max_restarts``). A hung
    process may not act on Ray's request: when it runs on this host (``info``: its ``node_info``), it is
    also sent SIGKILL."""
    try:
        ray.kill(handle, no_restart=False)
    except Exception as e:  # noqa: BLE001 - already gone
        log.debug("ray.kill: %s", e)
    pid = (info or {}).get("pid")
    if pid and (info or {}).get("host") == socket.gethostname():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def creation_failed(err: ActorDiedError) -> bool:
    """The actor died in ``__init__`` (a configuration error: restarting it would fail the same way)."""
    return "creation task" in str(err) or "__init__" in str(err)


def _creation_cause(err: ActorDiedError) -> str:
    text = str(err)
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    errors = [t for t in lines if ("Error:" in t or "Error(" in t) and not t.startswith("ray.exceptions")]
    return (errors[-1] if errors else lines[-1] if lines else text)[:500]


HEARTBEAT_SECONDS = 5.0
"""How often a busy actor is asked ``alive()``."""
SILENT_SECONDS = 10.0
"""A busy actor whose ``alive()`` has not answered for this long is silent (two heartbeats missed)."""


class HangWatch:
    """Which SAM actors are hung: a call past its deadline, and the actor silent.

    Calls to one actor run one after another, so a member's running call starts when it gets work while
    idle, or when its previous call returns with more queued. Deadline: ``max(min_s, factor x the median
    call time so far)``; before any call has returned, ``factor x min_s`` (the first call also loads
    weights and fills caches). The clock outlives a round, so later rounds use what earlier ones measured.
    A busy actor is asked ``alive()`` every ``HEARTBEAT_SECONDS``, which it answers from a thread of its
    own. A call past its deadline whose actor has been silent for ``SILENT_SECONDS`` is a hang (a stopped or
    wedged process); one whose actor still answers is busy (a case that missed the embedding cache can take
    far longer than the cached ones that set the median) and is given more time, with one warning.
    """

    def __init__(self, min_s: float, factor: float):
        self.min_s, self.factor = min_s, factor
        self.durations: list[float] = []
        self.since: dict[int, float] = {}
        self.probes: dict[int, tuple[object | None, float, float]] = {}  # member -> (pending, sent, last answer)
        self.warned: set[int] = set()

    def deadline(self) -> float:
        if not self.durations:
            return self.factor * self.min_s
        return max(self.min_s, self.factor * float(statistics.median(self.durations[-200:])))

    def submitted(self, m: Member, was_idle: bool) -> None:
        if was_idle:
            self.since[m.index] = time.monotonic()

    def returned(self, m: Member, more_queued: bool) -> None:
        now = time.monotonic()
        if m.index in self.since:
            self.durations.append(now - self.since[m.index])
        self.forget(m)
        if more_queued:
            self.since[m.index] = now

    def forget(self, m: Member) -> None:
        for d in (self.since, self.probes):
            d.pop(m.index, None)
        self.warned.discard(m.index)

    def hung(self, members: list[Member]) -> list[tuple[Member, float]]:
        """(member, seconds its call has run) for each member found hung now (see the class docstring)."""
        now, limit, out = time.monotonic(), self.deadline(), []
        for index, started in list(self.since.items()):
            m = members[index]
            ref, sent, answered = self.probes.get(index, (None, 0.0, started))
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                ref, answered = None, now
            if ref is None and now - sent >= HEARTBEAT_SECONDS:
                ref, sent = m.handle.alive.remote(), now
            self.probes[index] = (ref, sent, answered)
            if now - started <= limit:
                continue
            if now - answered > SILENT_SECONDS:
                out.append((m, now - started))
            elif index not in self.warned:
                self.warned.add(index)
                log.warning("%s: its call has run %.0f s, past the deadline of %.0f s, but the actor answers: "
                            "waiting for it", m.label, now - started, limit)
        return out
