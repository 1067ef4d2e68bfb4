"""Training batches built ahead, in a background thread, while the network trains on the current one.

A round's batches are a fixed sequence: each one's crops and augmentations come from the round's
generator (``SpecialistTrainer._seed_round``) in order. ``Prefetcher`` calls the same ``make`` function
the same number of times, in the same order, from one producer thread, so the batches (and the run's
results) are those of building them in the training thread; only *when* they are built changes. NumPy and
SciPy release the GIL in their array loops, so the crops overlap with PyTorch's compute.

    with Prefetcher(make_batch, count=iterations, depth=2) as batches:
        for batch in batches: ...
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Yields ``make()`` ``count`` times; with ``depth`` > 0 up to ``depth`` results are built ahead by one
    daemon thread (an exception there is raised in the consumer, at the batch it would have been);
    ``depth`` 0 calls ``make`` in the consumer's thread. Leaving the ``with`` block early stops the
    producer after the batch it is building."""

    def __init__(self, make: Callable[[], T], count: int, depth: int):
        self.make, self.count, self.depth = make, count, depth
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None

    def _put(self, item) -> bool:
        """Put ``item`` unless the consumer left first; returns whether it was put."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for _ in range(self.count):
                if self._stop.is_set() or not self._put(self.make()):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            self._put(_Failed(e))
            return
        self._put(_DONE)

    def __enter__(self) -> Prefetcher[T]:
        if self.depth > 0 and self.count > 0:
            self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[T]:
        if self._thread is None:
            for _ in range(self.count):
                yield self.make()
            return
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # the producer sees the stop within 0.1 s, after the batch it is building
