"""Bitrix24's two REST limits.

* :class:`LeakyBucket` - the per-portal request-rate limit (HTTP 503 ``QUERY_LIMIT_EXCEEDED``):
  every request adds 1, the level drains at ``rate`` per second, and a request that would push
  the level above ``burst`` is refused (and not executed).
* :class:`OperatingMeter` - the per-method "operating time" limit (HTTP 429
  ``OPERATION_TIME_LIMIT``): execution seconds summed over the last 10 buckets of
  ``bucket_seconds`` (one minute by default); once the sum exceeds the limit, the method is
  blocked until the oldest bucket drops out (``operating_reset_at``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WINDOW_BUCKETS = 10


@dataclass
class LeakyBucket:
    level: float = 0.0
    updated: float = 0.0

    def drain(self, now: float, rate: float) -> None:
        if self.updated:
            self.level = max(0.0, self.level - (now - self.updated) * rate)
        self.updated = now

    def try_add(self, now: float, rate: float, burst: float) -> bool:
        """Add one request; False (and nothing added) if that would exceed ``burst``."""
        self.drain(now, rate)
        if self.level + 1 > burst:
            return False
        self.level += 1
        return True


@dataclass
class OperatingMeter:
    # method -> {bucket index -> seconds}
    buckets: dict[str, dict[int, float]] = field(default_factory=dict)

    @staticmethod
    def _index(now: float, width: float) -> int:
        return math.floor(now / width)

    def _live(self, method: str, now: float, width: float) -> dict[int, float]:
        table = self.buckets.get(method)
        if not table:
            return {}
        oldest_allowed = self._index(now, width) - WINDOW_BUCKETS + 1
        for index in [i for i in table if i < oldest_allowed]:
            del table[index]
        return table

    def total(self, method: str, now: float, width: float) -> float:
        return sum(self._live(method, now, width).values())

    def reset_at(self, method: str, now: float, width: float) -> int:
        """When the oldest counted bucket leaves the window (unix time)."""
        table = self._live(method, now, width)
        oldest = min(table) if table else self._index(now, width)
        return math.ceil((oldest + WINDOW_BUCKETS) * width)

    def add(self, method: str, now: float, width: float, seconds: float) -> None:
        if seconds <= 0:
            return
        table = self.buckets.setdefault(method, {})
        index = self._index(now, width)
        table[index] = table.get(index, 0.0) + seconds

    def blocked(self, method: str, now: float, width: float, limit: float) -> bool:
        return self.total(method, now, width) > limit
