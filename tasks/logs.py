"""Logging that reads well both in an Airflow task log and on a terminal."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("personcar")


class Progress:
    """Rate-limited progress lines: at most one every ``every`` seconds, plus the last one.

    With ``unit="bytes"`` the line reads in bytes, percent and MB/s. ``done`` starts a count that
    resumes part way (a resumed download); the rate counts only what this run added.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "items", every: float = 5.0,
                 done: int = 0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self._last = time.monotonic()
        self.done = self._base = done

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(now)

    def finish(self) -> None:
        self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        rate = (self.done - self._base) / max(now - self.start, 1e-9)
        if self.unit == "bytes":
            count, speed = f"{self.done} bytes", f"{rate / 1e6:.1f} MB/s"
            if self.total:
                count = f"{self.done} of {self.total} bytes"
        else:
            count, speed = f"{self.done} {self.unit}", f"{rate:.1f} {self.unit}/s"
            if self.total:
                count = f"{self.done}/{self.total} {self.unit}"
        pct = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        log.info("%s: %s%s, %s", self.what, count, pct, speed)
