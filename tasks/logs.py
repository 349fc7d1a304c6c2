"""Logging that reads well both in an Airflow task log and on a terminal."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("personcar")


class Progress:
    """Rate-limited progress lines: at most one every ``every`` seconds, plus the last one."""

    def __init__(self, what: str, total: int | None = None, unit: str = "items", every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self._last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(now)

    def finish(self) -> None:
        self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            pct = 100.0 * self.done / self.total
            log.info("%s: %d/%d %s (%.1f%%), %.1f %s/s", self.what, self.done, self.total,
                     self.unit, pct, rate, self.unit)
        else:
            log.info("%s: %d %s, %.1f %s/s", self.what, self.done, self.unit, rate, self.unit)
