"""Prometheus metrics read at scrape time, and the registry that `/metrics`
(b24app.metrics_view) serves: every process's counts (b24app.metrics) and the facts read now.

What is really a fact of the database or Redis — pins waiting, tasks queued, which portals'
buckets hold calls back — is read when Prometheus asks (`Facts`), never kept in a process's
memory (b24app.metrics says why). A feature adds its own with `metrics.register_fact`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import redis
from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from b24app.metrics import (
    _LIMITER_KEY,
    LIMITER_WINDOW,
    MULTIPROC_DIR,
    PORTALS_SHOWN,
    Fact,
    _facts,
    gauge,
)
from b24app.redisconn import redis_client

log = logging.getLogger(__name__)


# kombu's Redis transport keeps a queue's messages in one list per priority step, and the
# messages workers took (running, or waiting for their countdown) in the hash "unacked".
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def _broker_facts() -> Iterator[Metric]:
    queues = settings.FLOWPINS_QUEUES
    client = redis.Redis.from_url(
        settings.CELERY_BROKER_URL, socket_connect_timeout=1, socket_timeout=2
    )
    try:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
            for step in _PRIORITY_STEPS:
                pipe.llen(f"{queue}{_PRIORITY_SEP}{step}")
        pipe.hlen("unacked")
        *lengths, unacked = pipe.execute()
    finally:
        client.close()
    depth = GaugeMetricFamily(
        "flowpins_celery_queue_length",
        "Tasks waiting in each of the broker's queues",
        labels=["queue"],
    )
    per_queue = 1 + len(_PRIORITY_STEPS)
    for n, queue in enumerate(queues):
        depth.add_metric([queue], float(sum(lengths[n * per_queue : (n + 1) * per_queue])))
    yield depth
    yield gauge(
        "flowpins_celery_tasks_reserved",
        "Tasks workers took and have not finished (running, or waiting for their countdown)",
        float(unacked),
    )


def _limiter_facts() -> Iterator[Metric]:
    now = int(time.time() // 60)
    minutes = int(LIMITER_WINDOW.total_seconds() // 60)
    keys = [_LIMITER_KEY.format(minute=now - n) for n in range(minutes)]
    totals: dict[str, float] = {}
    pipe = redis_client().pipeline(transaction=False)
    for key in keys:
        pipe.zrange(key, 0, -1, withscores=True)
    for rows in pipe.execute():
        for member, seconds in rows:
            name = member.decode() if isinstance(member, bytes) else str(member)
            totals[name] = totals.get(name, 0.0) + float(seconds)
    family = GaugeMetricFamily(
        "flowpins_portal_limiter_wait_seconds",
        f"Seconds calls waited for (or stepped aside from) a portal's bucket in the last "
        f"{minutes} minutes: the {PORTALS_SHOWN} portals that waited most",
        labels=["member_id"],
    )
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:PORTALS_SHOWN]:
        family.add_metric([name[:64]], seconds)
    yield family


class Facts(Collector):
    """What the database, the broker and Redis say at the moment of the scrape. A source that
    does not answer is reported down (flowpins_scrape_source_up) instead of failing the scrape."""

    def collect(self) -> Iterable[Metric]:
        sources: list[tuple[str, Fact]] = [
            ("broker", _broker_facts),
            ("redis", _limiter_facts),
            *(("database", fact) for fact in _facts),
        ]
        up = GaugeMetricFamily(
            "flowpins_scrape_source_up", "Whether a scrape-time source answered", labels=["source"]
        )
        answered: dict[str, bool] = {}
        for source, fact in sources:
            try:
                found = list(fact())
            except Exception:  # a source down is a fact too
                log.warning("metrics: the %s did not answer", source, exc_info=True)
                answered[source] = False
                continue
            answered.setdefault(source, True)
            yield from found
        for source, ok in answered.items():
            up.add_metric([source], 1.0 if ok else 0.0)
        yield up


class _ThisProcess(Collector):
    """Without PROMETHEUS_MULTIPROC_DIR (one process, e.g. the tests): its own metrics."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def scrape_registry() -> CollectorRegistry:
    """A registry for one scrape: every process's counts, and the facts read now."""
    registry = CollectorRegistry()
    if MULTIPROC_DIR:
        MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(Facts())
    return registry
