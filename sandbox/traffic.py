"""How many REST calls the portals are serving at once: the load a client keeps in flight.

Every portal REST request counts from the moment it arrives until its answer is built (the
``latency_ms`` sleep included), across all portals. ``GET /_sandbox/traffic`` reads the figures;
``POST /_sandbox/traffic`` starts them afresh (a benchmark does so before each measured run).
"""

from __future__ import annotations

import threading
import time
from typing import Any


class Traffic:
    """Calls in flight now, at most, and on average over the busy time since the last reset."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.in_flight = 0
            self.peak = 0
            self.calls = 0
            self._area = 0.0  # integral of calls in flight over time (call-seconds)
            self._busy = 0.0  # seconds with at least one call in flight
            self._since = self._clock()

    def _advance(self) -> None:
        now = self._clock()
        elapsed = now - self._since
        self._area += self.in_flight * elapsed
        if self.in_flight:
            self._busy += elapsed
        self._since = now

    def enter(self) -> None:
        with self._lock:
            self._advance()
            self.in_flight += 1
            self.calls += 1
            self.peak = max(self.peak, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self._advance()
            self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._advance()
            mean = self._area / self._busy if self._busy else 0.0
            return {
                "in_flight": self.in_flight,
                "peak": self.peak,
                "calls": self.calls,
                "call_seconds": round(self._area, 3),
                "busy_seconds": round(self._busy, 3),
                "mean_in_flight": round(mean, 2),
            }
