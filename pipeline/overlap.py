"""Overlapped rounds (``workers.overlap``): the trainer trains while the SAM pool relabels.

    sequential   round r:  relabel with checkpoint r-1 -> store r;  then train round r on store r
    overlapped   round r:  relabel with checkpoint r-1 -> store r   | train round r on store r-1
                                                                      (made by checkpoint r-2)

Store r is made by checkpoint r-1 in both modes (the provenance chain is the same); in overlapped mode
training uses it one round later: its masks are one round stale, which the manifest records
(``trained_in_round`` = r + 1) and the round summary too. Round 1 trains without pseudo-labels (there is
no store 0), and the last round relabels nothing (its store would feed no training).

Training runs in a thread of the driver (a Ray call it waits on); the relabel loop runs in the driver's
main thread. Either half failing stops the other at its next poll (:class:`LinkedStop`), and the first
real error is raised; Ctrl-C stops both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from pipeline.interrupt import StopFlag

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """One half of an overlapped round stopped because the other failed (internal)."""


class LinkedStop:
    """A stop flag that also stops when ``other_failed`` is set: the other half of the round failed."""

    def __init__(self, stop: StopFlag, other_failed: threading.Event, why: str):
        self.stop, self.other_failed, self.why = stop, other_failed, why

    def check(self) -> None:
        self.stop.check()
        if self.other_failed.is_set():
            raise Cancelled(self.why)


class SideBySide:
    """Training in a thread beside the relabel loop of the calling thread."""

    def __init__(self, stop: StopFlag):
        self.train_failed = threading.Event()
        self.relabel_failed = threading.Event()
        self.train_stop = LinkedStop(stop, self.relabel_failed, "relabeling failed")
        self.relabel_stop = LinkedStop(stop, self.train_failed, "training failed")
        self._future: Future | None = None

    def start_training(self, train: Callable[[LinkedStop], object]) -> None:
        """Start ``train(stop)`` in its own thread (once)."""
        def body():
            try:
                return train(self.train_stop)
            except BaseException:
                self.train_failed.set()
                raise

        pool = ThreadPoolExecutor(1, thread_name_prefix="overlap-train")
        self._future = pool.submit(body)
        pool.shutdown(wait=False)

    def run(self, relabel: Callable[[LinkedStop], object]) -> object:
        """Run ``relabel(stop)`` here (it starts the training, see :meth:`start_training`), then wait for the
        training. Raises the first real error of either half (a half cancelled by the other's failure is not
        one); returns what ``relabel`` returned."""
        try:
            out = relabel(self.relabel_stop)
        except Cancelled:
            out = None  # training failed: its error is raised below
        except BaseException:
            self.relabel_failed.set()
            self._wait_quietly()
            raise
        if self._future is not None:
            self._future.result()
        return out

    def _wait_quietly(self) -> None:
        """After relabeling failed: let the training half stop (it sees the flag within a poll)."""
        if self._future is None:
            return
        try:
            self._future.result()
        except Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - the relabel error is the one raised; this one is logged
            log.warning("training stopped too, with: %s", e)
