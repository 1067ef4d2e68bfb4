"""Ctrl-C and SIGTERM stop a run within seconds, keeping completed work.

``semisam run`` installs the flag first thing, before its heavy imports, preflight, Ray's start-up and
placement, and keeps it until the process exits (shutdown included), so a signal at any moment is seen.
The first SIGINT/SIGTERM only sets a flag; the coordinator checks it after each start-up step and polls it
(every wait on Ray is at most ``POLL_SECONDS`` long), writes what is finished, and raises :class:`pipeline.errors.Interrupted`; the
CLI then shuts the actors (and a self-started Ray) down and exits 130 (SIGINT) or 143 (SIGTERM). A
second signal while stopping raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import logging
import signal
import threading

from pipeline.errors import Interrupted

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class StopFlag:
    """Installed for the duration of a run (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, object] = {}
        self._depth = 0

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after the work in hand is saved (again to stop at once)",
                    signal.Signals(signum).name)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __enter__(self) -> StopFlag:
        if self._saved:  # already installed (the CLI's flag, entered again by the coordinator's run)
            self._depth += 1
            return self
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def reclaim(self) -> None:
        """Put the handlers back at the C level when installed: Ray's core worker (started by ``ray.init``)
        installs a native SIGTERM handler that dumps a stack and aborts (exit -6) instead of calling ours;
        setting ours again after ``ray.init`` takes the signal back."""
        for sig in self._saved:
            signal.signal(sig, self._handle)

    def __exit__(self, *exc) -> None:
        if self._depth:
            self._depth -= 1
            return
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)
