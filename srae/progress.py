"""Progress of long loops as occasional log lines (pipeline logs have no room for bars)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class ProgressLog:
    """Logs ``"<what>: <done> of <total> <unit> (<elapsed>, about <left> left)"`` at most once
    every ``every`` seconds, so short work logs nothing and long work (CUB on a CPU: hours of
    training) shows it is moving and how far it has to go. ``detail`` adds text per line."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str, *, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._what, self._total, self._unit = logger, what, int(total), unit
        self._every, self._clock = float(every), clock
        self._start = self._last = clock()

    def update(self, done: int, detail: str = "") -> None:
        now = self._clock()
        if now - self._last < self._every or done >= self._total:
            return
        self._last = now
        elapsed = now - self._start
        left = f", about {_minutes(elapsed * (self._total - done) / done)} left" if done > 0 else ""
        extra = f"; {detail}" if detail else ""
        self._log.info("%s: %d of %d %s (%s%s)%s", self._what, done, self._total, self._unit, _minutes(elapsed),
                       left, extra)
