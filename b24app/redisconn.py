"""The app's Redis connection (buckets, locks, caches): one client per process, to
settings.REDIS_URL. Celery's broker connects on its own."""

from __future__ import annotations

import redis
from django.conf import settings

_client: redis.Redis | None = None


def redis_client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
        )
    return _client
