"""One driver per run folder: a lock file with host, pid and a heartbeat.

``<run folder>/driver.lock`` (JSON) names the driver that owns the folder: host, pid, a random token,
when it started and its last heartbeat (renewed every ``heartbeat_s`` by a thread). A second driver is
refused with a message saying who holds the folder. A lock is *stale*, and taken over, when its driver
is gone: on the same host its pid no longer runs; anywhere, its heartbeat is older than ``stale_after_s``
(a live driver renews it every ``stale_after_s / 4``; a pid that still runs may be another process that
got the dead driver's pid, e.g. after a reboot, so a live pid with an old heartbeat is stale too).

The token doubles as the run folder's identity for actors: each actor reads the lock at start and checks
the token the driver gave it, which proves it sees the same folder (a node without the shared storage
sees no lock, or someone else's).

Local folders take the lock with an exclusive create (atomic); object storage has no such primitive in
fsspec, so there the lock is written, read back after a short pause, and the driver proceeds only if
its own token is still there (two drivers starting within that pause could both miss each other: rare,
and docs/faults.md says to start one driver per run folder).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time

from pipeline.errors import RunLockedError
from pipeline.run_folder import RunFolder
from pipeline.storage import Location

log = logging.getLogger(__name__)



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(run_dir: Location) -> dict | None:
    """The lock's content, or None when there is no (readable) lock."""
    loc = RunFolder(run_dir).lock_loc
    try:
        return json.loads(loc.read_text())
    except Exception:  # noqa: BLE001 - missing, half-written by a dying driver or unreadable: no lock
        return None


class RunLock:
    """Hold ``run_dir``'s lock while a driver works on it; use as a context manager or acquire/release."""

    def __init__(self, run_dir: Location, stale_after_s: float = 60.0, heartbeat_s: float | None = None):
        self.run_dir = Location.of(run_dir)
        self.loc = RunFolder(self.run_dir).lock_loc
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s or max(0.5, stale_after_s / 4)
        self.token = secrets.token_hex(8)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                     "started": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- acquiring ------------------------------------------------------------------------------
    def _stale_reason(self, other: dict) -> str | None:
        """Why ``other``'s lock may be taken over, or None when its driver still lives."""
        age = time.time() - float(other.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (more than workers.faults.lock_stale_s={self.stale_after_s:.0f})"
        if other.get("host") == self.info["host"]:
            pid = int(other.get("pid", -1))
            return None if pid > 0 and _pid_alive(pid) else f"its driver (pid {pid}) is gone"
        return None

    def _refuse(self, other: dict) -> RunLockedError:
        age = time.time() - float(other.get("heartbeat", 0))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("started", 0))))
        return RunLockedError(
            f"run folder {self.run_dir} is in use by another semisam driver (host {other.get('host')}, pid "
            f"{other.get('pid')}, started {started}, last heartbeat {age:.0f} s ago). Two drivers on one run "
            f"folder would overwrite each other's checkpoints and manifest: wait for it to finish or stop it, "
            f"or use another name=/output_dir=. If that driver is dead, this lock is taken over "
            f"automatically once its heartbeat is {self.stale_after_s:.0f} s old (workers.faults.lock_stale_s); "
            f"to take it over now, make sure no driver runs on this folder and delete {self.loc}")

    def acquire(self) -> RunLock:
        self.run_dir.mkdir()
        payload = json.dumps(self.info).encode()
        if self.loc.is_local and self._create_exclusive(payload):
            return self._started()
        other = read_lock(self.run_dir)
        if other is not None and other.get("token") != self.token:
            reason = self._stale_reason(other)
            if reason is None:
                raise self._refuse(other)
            log.warning("taking over the lock of %s: %s (host %s, pid %s)", self.run_dir, reason,
                        other.get("host"), other.get("pid"))
        self.loc.write_bytes(payload)
        time.sleep(0.2)  # another driver taking over at the same moment shows up here
        now = read_lock(self.run_dir)
        if now is None or now.get("token") != self.token:
            raise self._refuse(now or {})
        return self._started()

    def _create_exclusive(self, payload: bytes) -> bool:
        try:
            fd = os.open(self.loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        return True

    def _started(self) -> RunLock:
        self._thread = threading.Thread(target=self._beat, name="semisam-run-lock", daemon=True)
        self._thread.start()
        return self

    # -- holding --------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = read_lock(self.run_dir)
                if current is not None and current.get("token") != self.token:
                    self.lost = True
                    log.error("the lock of %s was taken by host %s pid %s: this driver no longer owns the folder",
                              self.run_dir, current.get("host"), current.get("pid"))
                    return
                self.info["heartbeat"] = time.time()
                self.loc.write_bytes(json.dumps(self.info).encode())
            except Exception as e:  # noqa: BLE001 - a storage hiccup must not kill the run; next beat retries
                log.warning("could not renew the lock of %s: %s", self.run_dir, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        current = read_lock(self.run_dir)
        if current is not None and current.get("token") == self.token:
            try:
                self.loc.remove()
            except Exception as e:  # noqa: BLE001 - called on the way out, maybe after another error
                log.warning("could not remove the lock %s (%s): the next run takes it over once it is stale",
                            self.loc, e)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_sees_run_folder(run_dir: str | os.PathLike | Location, token: str, where: str) -> None:
    """Called by each actor at start: it must see the lock the driver wrote (proof of shared storage)."""
    from pipeline.errors import StoreError

    lock = read_lock(Location.of(run_dir))
    if lock is not None and lock.get("token") == token:
        return
    seen = "no run lock there" if lock is None else f"a lock of another driver (host {lock.get('host')})"
    raise StoreError(
        f"{where} does not see the run folder {run_dir} that the driver created ({seen}). Every node must see "
        "the same run folder: put output_dir on a shared filesystem mounted at the same path on every node, "
        "or on object storage (output_dir=s3://bucket/runs)")
