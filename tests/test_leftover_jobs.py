"""Jobs an earlier test run left in its broker (a run without a worker, or one interrupted) are
dropped before the session's worker starts: it would run them against this run's fresh database.
Only the given queues' jobs go (the session drops all of the app's queues): other queues, and the
unacknowledged jobs of other queues, stay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from b24app.celery import app
from tests.conftest import drop_leftover_jobs

pytestmark = pytest.mark.services

# Not the session worker's queues (it would take the jobs planted here before the drop could).
QUEUE, SECOND, OTHER = "leftover-probe", "leftover-probe.second", "leftover-probe-other"


def _probe_keys(redis_client: redis_lib.Redis) -> list[bytes]:
    return sorted(redis_client.scan_iter(match="leftover-probe*", count=1000))


@pytest.fixture
def channel(redis_client: redis_lib.Redis) -> Iterator[Any]:
    """The broker channel the app publishes on; the probe's keys are gone afterwards."""
    with app.connection_for_write() as conn:
        yield conn.default_channel
        for key in _probe_keys(redis_client):
            redis_client.delete(key)
        for tag in ("probe-taken", "probe-second-taken", "probe-other-taken"):
            redis_client.hdel(conn.default_channel.unacked_key, tag)
            redis_client.zrem(conn.default_channel.unacked_index_key, tag)


def test_jobs_left_in_the_queue_or_taken_unacknowledged_are_dropped_and_nothing_else(
    redis_client: redis_lib.Redis, channel: Any
) -> None:
    # A run without a worker: queued jobs, one at a raised priority (its own list in Redis).
    app.send_task("flows.converge", kwargs={"portal_id": 1, "user_id": 2}, queue=QUEUE)
    app.send_task("flows.converge", kwargs={"portal_id": 1, "user_id": 3}, queue=QUEUE, priority=9)
    app.send_task("flows.refresh_snapshot", kwargs={"portal_id": 1, "user_id": 5}, queue=SECOND)
    app.send_task("flows.converge", kwargs={"portal_id": 1, "user_id": 4}, queue=OTHER)
    assert len(_probe_keys(redis_client)) == 4  # the queues, a priority list, the other queue
    # A worker killed mid-job: its message waits in the unacked set to be put back.
    taken = (("probe-taken", QUEUE), ("probe-second-taken", SECOND), ("probe-other-taken", OTHER))
    for tag, queue in taken:
        redis_client.hset(channel.unacked_key, tag, json.dumps([{"body": "x"}, "", queue]))
        redis_client.zadd(channel.unacked_index_key, {tag: 1.0})
    bindings = sorted(redis_client.scan_iter(match="_kombu.binding.*"))

    assert drop_leftover_jobs(QUEUE, SECOND) == 5

    assert _probe_keys(redis_client) == [OTHER.encode()] and redis_client.llen(OTHER) == 1
    for tag in ("probe-taken", "probe-second-taken"):
        assert not redis_client.hexists(channel.unacked_key, tag)
        assert redis_client.zscore(channel.unacked_index_key, tag) is None
    assert redis_client.hexists(channel.unacked_key, "probe-other-taken")
    assert redis_client.zscore(channel.unacked_index_key, "probe-other-taken") == 1.0
    assert sorted(redis_client.scan_iter(match="_kombu.binding.*")) == bindings
