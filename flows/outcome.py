"""What a convergence run ends with, as a value: done, retry after N seconds, or final."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.Enum):
    DONE = "done"  # nothing pending is left that this run could settle
    RETRY = "retry"  # run again after `delay` seconds
    FINAL = "final"  # stop; `reason` says why (the intents carry their problem)


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reason: str = ""
    delay: float = 0.0
    # RETRY: come back exactly after `delay` — the portal's bucket has room, a lost answer's
    # quiet period is over, or a bounded run has more to do; not an outage, so no backoff grows.
    exact: bool = False
    # The portal answered this run: whatever failed before it is over (the backoff starts afresh).
    progress: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    # DONE or FINAL: pins are still pending (a click landed as the run ended): run again now.
    again: bool = False

    @classmethod
    def done(cls, stats: dict[str, int]) -> Outcome:
        return cls(Kind.DONE, stats=stats)

    @classmethod
    def retry(
        cls, delay: float, reason: str, *, exact: bool = False, progress: bool = False
    ) -> Outcome:
        return cls(Kind.RETRY, reason, delay, exact=exact, progress=progress)

    @classmethod
    def final(cls, reason: str) -> Outcome:
        return cls(Kind.FINAL, reason)

    def __str__(self) -> str:
        if self.kind is Kind.DONE:
            return " ".join(f"{k}={v}" for k, v in self.stats.items())
        if self.kind is Kind.RETRY:
            return f"retry in {self.delay:.1f} s: {self.reason}"
        return f"stopped: {self.reason}"
