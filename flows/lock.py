"""The lock that makes one converger at a time per user: answers are never mixed."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from redis.exceptions import RedisError

from b24app.redisconn import redis_client

log = logging.getLogger(__name__)

LOCK_TTL_MS = 120_000


class Busy(Exception):
    """Another worker is converging this user's pins right now."""


class LockLost(Exception):
    """The run's lock lapsed or was taken over: it must not toggle or record anything more."""


_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""


class UserLock:
    """A Redis lock per (portal, user): one converger at a time, so answers are never mixed.

    A heartbeat renews it every third of its TTL for as long as the run holds it, however slow
    the portal's answers (a round can outlast the TTL), and keeps the run's other keys (the
    queued marker) alive with it. When a renewal finds the lock gone (taken over after Redis
    lost it, say) or cannot reach Redis for most of a TTL, the run stops before its next write.

    Its value names the holder (the Celery node), so a node restarted after a crash frees what
    its killed predecessor held at once (`release_locks_of`) instead of waiting out the TTL.
    """

    def __init__(
        self,
        portal_id: int,
        user_id: int,
        holder: str = "",
        *,
        ttl_ms: int | None = None,
        keep_alive: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.key = f"fp:conv:{portal_id}:{user_id}"
        self.token = f"{holder}|{uuid.uuid4().hex}"
        self.ttl_ms = ttl_ms or LOCK_TTL_MS
        self.keep_alive = keep_alive
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._valid_until = 0.0
        self._beat: threading.Thread | None = None

    def __enter__(self) -> UserLock:
        if not redis_client().set(self.key, self.token, nx=True, px=self.ttl_ms):
            raise Busy(self.key)
        self._valid_until = time.monotonic() + self.ttl_ms / 1000
        self._beat = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            started = time.monotonic()
            try:
                held = redis_client().eval(
                    _RENEW,
                    1 + len(self.keep_alive),
                    self.key,
                    *(key for key, _ in self.keep_alive),
                    self.token,
                    self.ttl_ms,
                    max([ttl for _, ttl in self.keep_alive], default=60),
                )
            except RedisError:
                continue  # check() stops the run once the last renewal is too old
            if not held:
                self._lost.set()
                return
            self._valid_until = started + self.ttl_ms / 1000

    def check(self) -> None:
        """Raise LockLost unless the lock is surely still ours for a while (a fifth of its TTL)."""
        margin = self.ttl_ms / 5000
        if self._lost.is_set() or time.monotonic() > self._valid_until - margin:
            raise LockLost(self.key)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
        script = (
            "if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) else return 0 end"
        )
        try:
            redis_client().eval(script, 1, self.key, self.token)
        except RedisError:
            log.warning("could not release a convergence lock; it lapses with its TTL")


def release_locks_of(holder: str) -> int:
    """Free the convergence locks held by `holder`. Only for a node that is starting and has run
    nothing yet: whatever it holds was left by a killed process (node names are unique)."""
    if not holder:
        return 0
    script = (
        "local v = redis.call('GET', KEYS[1]) "
        "if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then "
        "return redis.call('DEL', KEYS[1]) end return 0"
    )
    client = redis_client()
    return sum(
        int(client.eval(script, 1, key, f"{holder}|"))
        for key in client.scan_iter(match="fp:conv:*", count=500)
    )
