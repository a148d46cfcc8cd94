"""A private stack for tests that break things: its own Redis, web process and workers.

Everything else in the suite shares the session's worker and the machine's Redis; a test that
kills a worker or restarts the broker must not touch either.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devtools.supervisor import Process
from tests.faults.stack import RedisServer, start_web, start_worker
from tests.helpers import worker_paused


@dataclass
class PrivateStack:
    redis: RedisServer
    env: dict[str, str]
    web_url: str
    web_log: Path
    log_dir: Path
    workers: list[Process] = field(default_factory=list)

    @property
    def worker_log(self) -> Path:
        return self.log_dir / "worker.log"

    def worker(
        self,
        *,
        name: str = "faults",
        queues: Sequence[str] | None = None,
        concurrency: int = 2,
        **env: str,
    ) -> Process:
        """Start a worker on the private broker (the same node name each time, like a
        restart); by default it takes every queue of the app, like a single deployed worker.
        Another `name` starts a second node beside it, with a log of its own."""
        log = self.worker_log if name == "faults" else self.log_dir / f"{name}.log"
        proc = start_worker(
            {**self.env, **env}, log, name=f"{name}@%h", queues=queues, concurrency=concurrency
        )
        self.workers.append(proc)
        return proc


@pytest.fixture(scope="module")
def _private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def _private_web(
    worker_env: dict[str, str],
    _private_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], str, Path]]:
    env = {
        **worker_env,
        "REDIS_URL": _private_redis.url(0),
        "CELERY_BROKER_URL": _private_redis.url(0),
    }
    log = tmp_path_factory.mktemp("web") / "web.log"
    proc, base = start_web(env, log)
    yield env, base, log
    proc.stop()


@pytest.fixture
def private_stack(
    _private_redis: RedisServer,
    _private_web: tuple[dict[str, str], str, Path],
    tmp_path: Path,
) -> Iterator[PrivateStack]:
    """A clean private Redis, the private web process, and a way to start workers on them.

    The session's shared worker is paused meanwhile: it shares the database, and its sweep
    (every minute) would start runs for this test's pending pins under locks kept in the shared
    Redis — two runs converging one user at once, which no real deployment has. Queued jobs run
    in-process meanwhile (`WORKER["running"]` off), as without a worker.
    """
    if _private_redis.proc is None or _private_redis.proc.poll() is not None:
        _private_redis.start()  # an earlier test left it down
    _private_redis.flush()
    env, base, web_log = _private_web
    stack = PrivateStack(_private_redis, env, base, web_log, tmp_path)
    with worker_paused():
        try:
            yield stack
        finally:
            for proc in stack.workers:
                proc.stop(signal.SIGTERM)
