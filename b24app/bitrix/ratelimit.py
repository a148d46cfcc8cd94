"""One leaky bucket per portal, shared by every web and worker process through Redis.

Bitrix24 counts requests per portal (and source IP) in a leaky bucket: burst X, draining Y per
second (2/s and 50 by default, 5/s and 250 on Enterprise). We keep the same bucket on our side as a
GCRA ("theoretical arrival time") in one Lua script, so all processes draw from one budget and the
portal never has to answer 503. A `batch` is one request here, as it is for the portal.

`acquire()` reserves a slot: it returns at once when the bucket has room, sleeps when the wait is
short (the cheapest way to run at exactly the portal's rate), and raises `RateLimited` with the
time to wait when it is longer, so a Celery task can retry later instead of holding a worker.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings

from b24app import metrics
from b24app.bitrix.errors import OperationTimeLimit, RateLimited
from b24app.redisconn import redis_client

# KEYS[1]: bucket key. ARGV: now (s), interval (s per request), burst, max_wait (s).
# Returns {allowed(0/1), wait_seconds_as_string}. On allowed, the slot is reserved.
_GCRA = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
local wait = allow_at - now
if wait < 0 then wait = 0 end
if wait > max_wait then
  return {0, tostring(wait)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, tostring(wait)}
"""

# Push the bucket to "full" after the portal itself said QUERY_LIMIT_EXCEEDED (another app on our
# IP, or a limit lower than we assumed): everybody backs off for one interval at least.
_SATURATE = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local full = tonumber(ARGV[1]) + tonumber(ARGV[2]) * tonumber(ARGV[3])
if tat < full then
  redis.call('SET', KEYS[1], tostring(full), 'PX', math.ceil(tonumber(ARGV[2]) *
    tonumber(ARGV[3]) * 1000) + 1000)
end
return 1
"""

_scripts: dict[str, Any] = {}


def _script(name: str, source: str) -> Any:
    if name not in _scripts:
        _scripts[name] = redis_client().register_script(source)
    return _scripts[name]


# Our bucket runs a hair inside the portal's: requests do not arrive exactly when they were
# reserved, and at the boundary the portal answers 503.
RATE_MARGIN = 0.98
BURST_MARGIN = 1
# Slots of each portal's burst that bulk work leaves to interactive calls (single clicks, a
# page's first list). Small against the burst (50, or 250 on Enterprise).
INTERACTIVE_RESERVE = 5


class PortalRateLimiter:
    """The shared per-portal bucket; `rate`/`burst` default to the settings (2/s, 50)."""

    def __init__(self, member_id: str, rate: float | None = None, burst: int | None = None) -> None:
        self.member_id = member_id
        self.rate = (rate or settings.B24_RATE_PER_SECOND) * RATE_MARGIN
        full = burst or settings.B24_RATE_BURST
        self.burst = full - BURST_MARGIN if full > 2 * BURST_MARGIN else full
        self.key = f"fp:rl:{member_id}"

    def acquire(self, max_wait: float = 2.0, *, reserve: int = 0) -> float:
        """Reserve one request; sleep up to `max_wait` for it. Returns the seconds slept.

        `reserve`: slots of the burst this caller leaves free. Bulk work (a "Pin all" of
        thousands) passes INTERACTIVE_RESERVE, so however long it keeps the bucket busy, a
        colleague's single click still finds a slot at once instead of queueing behind it.
        """
        interval = 1.0 / self.rate
        burst = max(1, self.burst - reserve) if reserve else self.burst
        allowed, wait_s = _script("gcra", _GCRA)(
            keys=[self.key], args=[f"{time.time():.6f}", interval, burst, max_wait]
        )
        wait = float(wait_s)
        metrics.limiter_waited(self.member_id, wait, deferred=not allowed, bulk=reserve > 0)
        if not allowed:
            raise RateLimited(
                "LOCAL_RATE_LIMIT", "waiting for the portal's request budget", retry_after=wait
            )
        if wait > 0:
            time.sleep(wait)
        return wait

    def saturate(self) -> None:
        _script("saturate", _SATURATE)(
            keys=[self.key], args=[f"{time.time():.6f}", 1.0 / self.rate, self.burst]
        )


class MethodPause:
    """Per (portal, method) pause after OPERATION_TIME_LIMIT, until `operating_reset_at`."""

    def __init__(self, member_id: str, method: str) -> None:
        self.key = f"fp:op:{member_id}:{method}"

    def check(self) -> None:
        value = redis_client().get(self.key)
        if value is not None:
            reset_at = float(value)
            if reset_at > time.time():
                raise OperationTimeLimit(
                    description="method paused until the portal's operating-time window resets",
                    reset_at=reset_at,
                )

    def pause_until(self, reset_at: float) -> None:
        ttl = max(1, int(reset_at - time.time()) + 1)
        redis_client().set(self.key, f"{reset_at:.3f}", ex=ttl)


def take(key: str, rate: float, burst: int) -> float:
    """Take one token from the bucket `key` if it has one: 0.0, else the seconds until it will
    (nothing is taken then). The same GCRA as the portals' buckets, with no waiting."""
    allowed, wait_s = _script("gcra", _GCRA)(
        keys=[f"fp:bucket:{key}"], args=[f"{time.time():.6f}", 1.0 / rate, burst, 0]
    )
    return 0.0 if allowed else max(0.001, float(wait_s))
