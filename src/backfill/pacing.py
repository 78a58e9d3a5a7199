"""Time-keeping for a run: the injectable clock and the ticker that spaces progress writes out.

Pure: no database, no threads; tests drive it with a fake clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from backfill.types import Clock


def wall_clock() -> float:
    return time.time()


@dataclass
class Ticker:
    """True at most once per `interval` seconds (and always on the first call)."""

    interval: float
    clock: Clock = wall_clock
    _last: float | None = field(default=None, init=False)

    def due(self) -> bool:
        now = self.clock()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False
