"""Plain progress lines (no terminal escape codes, so they read well under ``ray job submit`` and in logs).

    progress = Progress("relabel round 1", total=199, unit="cases", logger=log)
    progress.advance(1)   # logs at most every ``every_s`` seconds, and at the end:
    # relabel round 1: 40/199 cases (20%), 2.10 cases/s, ETA 76 s
"""

from __future__ import annotations

import logging
import time


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 120:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


class Progress:
    def __init__(self, what: str, total: int, unit: str, logger: logging.Logger, every_s: float = 10.0,
                 clock=time.monotonic):
        self.what, self.total, self.unit, self.log, self.every_s, self.clock = what, total, unit, logger, every_s, clock
        self.done = 0
        self.start = clock()
        self.last = self.start

    def line(self, extra: str = "") -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
                f"ETA {format_seconds(eta)}")
        return f"{text}, {extra}" if extra else text

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.log.info(self.line(extra))
