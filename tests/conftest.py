"""Shared fixtures: the real services, the simulated portal, live app server and Celery worker.

Tests marked `services` need PostgreSQL (DATABASE_URL) and Redis; `browser` tests need Chromium.
On a machine without them those tests are skipped and say why; with FLOWPINS_REQUIRE_SERVICES=1
(CI) any skipped test fails the run instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from django.conf import settings

from devtools.procs import worker_command
from devtools.supervisor import Process, start
from tests.helpers import WORKER, settle_background_work

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SERVICES = os.environ.get("FLOWPINS_REQUIRE_SERVICES") == "1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The session's worker takes jobs from every queue of the app, as one dev worker does.
WORKER_QUEUES = settings.FLOWPINS_QUEUES


def _postgres_ok() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "services" in item.keywords and not _postgres_ok():
            item.add_marker(pytest.mark.skip(reason="needs PostgreSQL: set DATABASE_URL"))
        if "browser" in item.keywords and not CHROMIUM:
            item.add_marker(pytest.mark.skip(reason="needs Chromium (apt-get install chromium)"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REQUIRE_SERVICES:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        print(f"\nFLOWPINS_REQUIRE_SERVICES=1: {skipped} test(s) skipped; failing the run.")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _clean_redis(redis_client: redis_lib.Redis) -> None:
    """Rate-limit buckets, locks and caches must not leak from one test into the next.

    Only the app's own keys go: the broker's queues and bindings live in the same database.
    """
    for pattern in ("fp:*", "flowpins:*"):
        keys = list(redis_client.scan_iter(match=pattern, count=1000))
        if keys:
            redis_client.delete(*keys)


# --- the simulated portal -------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[Any]:
    from sandbox.server import SandboxServer

    srv = SandboxServer(
        host="127.0.0.1",
        port=0,
        app_url="http://127.0.0.1:1",  # replaced by tests that need the app reachable
        client_id=settings.B24_CLIENT_ID,
        client_secret=settings.B24_CLIENT_SECRET,
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def sandbox(sandbox_server: Any, settings: Any) -> Iterator[Any]:
    """A freshly reset sandbox, allow-listed as the OAuth server for this test.

    Torn down before the test's database is flushed: a list refresh the test queued is left to
    finish first, so the worker does not write into (or deadlock with) the flush.
    """
    import requests

    requests.post(f"{sandbox_server.url}/_sandbox/reset", timeout=5).raise_for_status()
    settings.B24_OAUTH_SERVERS = [f"{sandbox_server.url}/"]
    settings.B24_ALLOW_HTTP = True
    yield sandbox_server
    settle_background_work()


# --- a real Celery worker ---------------------------------------------------------------------


def drop_leftover_jobs(*queues: str) -> int:
    """Drop the jobs waiting in these queues of this run's broker, and those a stopped worker
    had taken from them without acknowledging them (kombu puts those back after the visibility
    timeout). An earlier run without a worker, or one interrupted, leaves them there; the
    session's worker would otherwise run them against this run's fresh database. The queues'
    bindings stay. Returns how many were dropped."""
    import json

    from b24app.celery import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        dropped = 0
        for queue in queues:
            dropped += channel.queue_purge(queue) or 0  # every priority step of the queue
        client = channel.client
        taken = [
            tag
            for tag, entry in client.hgetall(channel.unacked_key).items()
            if json.loads(entry)[2] in queues  # [message, exchange, routing key]
        ]
        if taken:
            client.hdel(channel.unacked_key, *taken)
            client.zrem(channel.unacked_index_key, *taken)
    return dropped + len(taken)


@pytest.fixture(scope="session")
def worker_env(django_db_setup: Any, sandbox_server: Any) -> dict[str, str]:
    """The environment a separate worker or web process needs to share this test run's state."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=(
            f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        ),
        REDIS_URL=settings.REDIS_URL,
        B24_OAUTH_SERVERS=f"{sandbox_server.url}/",
        B24_ALLOW_HTTP="1",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture(scope="session")
def celery_worker_process(
    worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """The session's worker; tests/faults pause it (WORKER["proc"]) while a private stack runs."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    cmd = worker_command(concurrency=4, queues=WORKER_QUEUES, quiet=True)
    drop_leftover_jobs(*WORKER_QUEUES)
    # It reads pin states only when asked, and only the tests about reading ask.
    proc = start("celery worker", cmd, env={**worker_env, "FLOWPINS_READ_PINS": "1"}, log=log)
    try:
        proc.wait_for_log("ready.", 40)
        WORKER["running"] = True  # from now on a worker, not the test, runs queued jobs
        WORKER["proc"] = proc
        yield proc
    finally:
        WORKER["running"] = False
        WORKER["proc"] = None
        proc.stop(seconds=15)
