"""The whole system as separate processes for the benchmarks: the sandbox, gunicorn, Celery
workers, on a dedicated PostgreSQL database and Redis database. Loopback only."""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from devtools.procs import free_port, worker_command
from devtools.supervisor import Process, Supervisor

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "local.sandbox0000000001"
CLIENT_SECRET = "sandbox-client-secret"
WORKER_THREADS = 32  # a worker process's threads, as the settings' default


def fresh_database(url: str) -> None:
    """(Re)create the benchmark database: every run starts from the same empty schema."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError("unexpected database name")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


class Stack:
    def __init__(
        self, *, portals: int = 5, workers: int = 2, tmp: Path, keys: dict[str, str] | None = None
    ) -> None:
        """`keys`: SECRET_KEY and B24_TOKEN_KEY of an earlier stack on the same database, so
        this process (set up for that one) still reads what this one writes."""
        self.portals = portals
        self.workers = workers
        self.tmp = tmp
        self.sandbox_url = f"http://127.0.0.1:{free_port()}"
        self.web_port = free_port()
        self.web_url = f"http://127.0.0.1:{self.web_port}"
        self.env = dict(os.environ)
        self.env.update(
            DJANGO_SETTINGS_MODULE="b24app.settings",
            DEBUG="0",
            SECRET_KEY=secrets.token_urlsafe(50),
            B24_TOKEN_KEY=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            B24_CLIENT_ID=CLIENT_ID,
            B24_CLIENT_SECRET=CLIENT_SECRET,
            ALLOWED_HOSTS="*",
            B24_ALLOW_HTTP="1",
            SECURE_SSL_REDIRECT="0",  # plain http on loopback: no TLS proxy in front
            B24_OAUTH_SERVERS=f"{self.sandbox_url}/",
            B24_APP_BASE_URL=self.web_url,
            B24_JS_SDK_URL="",
            LOG_LEVEL="WARNING",
            FLOWPINS_ENV_FILE=os.devnull,
            # Opens read no pin states by themselves: the sections that pin compare against
            # runs before reading existed; bench_reads asks for its reads itself.
            FLOWPINS_READ_PINS="0",
            DATABASE_URL=os.environ.get(
                "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/flowpins_bench"
            ),
            REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2"),
            PYTHONPATH=str(ROOT),
        )
        self.env.update(keys or {})
        self.supervisor = Supervisor(env=self.env, cwd=ROOT, log_dir=tmp)

    # -- processes ---------------------------------------------------------------------------
    @property
    def procs(self) -> dict[str, Process]:
        return self.supervisor.procs

    def _start(self, name: str, cmd: list[str], **env: str) -> Process:
        return self.supervisor.start(name, cmd, env)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start(self) -> None:
        import redis

        fresh_database(self.env["DATABASE_URL"])
        redis.Redis.from_url(self.env["REDIS_URL"]).flushdb()
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=ROOT,
            env=self.env,
            check=True,
        )
        port = self.sandbox_url.rsplit(":", 1)[1]
        self._start(
            "sandbox",
            [
                sys.executable,
                "-m",
                "sandbox",
                "--port",
                port,
                "--portals",
                str(self.portals),
                "--app-url",
                self.web_url,
            ],
        )
        self._start(
            "web",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "b24app.wsgi",
                "--bind",
                f"127.0.0.1:{self.web_port}",
                "--workers",
                "2",
                "--threads",
                "8",
                "--worker-class",
                "gthread",
                "--log-level",
                "warning",
            ],
        )
        for n in range(self.workers):  # separate worker processes, each with its thread pool
            self.start_worker(f"worker{n + 1}", WORKER_THREADS)
        self.procs["sandbox"].wait_for_http(f"{self.sandbox_url}/_sandbox/state")
        self.procs["web"].wait_for_http(f"{self.web_url}/ping")
        for n in range(self.workers):
            self.wait_worker(f"worker{n + 1}")

    def start_worker(
        self,
        name: str,
        concurrency: int,
        queue: str | None = None,
        pool: str = "threads",
        queues: list[str] | None = None,
        **env: str,
    ) -> None:
        """One Celery worker process with a pool of `concurrency` threads (or greenlets, with
        pool="gevent"), taking jobs from every queue of the app (or from `queue` alone)."""
        cmd = worker_command(
            concurrency=concurrency,
            hostname=f"{name}@%h",
            queue=queue,
            queues=queues,
            quiet=True,
            pool=pool,
        )
        self._start(name, cmd, **env)

    def restart_workers(
        self,
        concurrency: int = 0,
        pool: str = "threads",
        queues: list[str] | None = None,
        seconds: float = 40,
        **env: str,
    ) -> None:
        """Stop the stack's worker processes (those running) and start them again as asked
        (`concurrency` 0: WORKER_THREADS, the settings' default); returns once all are ready."""
        for n in range(self.workers):
            name = f"worker{n + 1}"
            if name in self.procs and self.procs[name].alive():
                self.stop_proc(name)
            self.start_worker(name, concurrency or WORKER_THREADS, pool=pool, queues=queues, **env)
        for n in range(self.workers):
            self.wait_worker(f"worker{n + 1}", seconds)

    def wait_worker(self, name: str, seconds: float = 40) -> None:
        self.procs[name].wait_for_log("ready.", seconds)

    def pause_workers(self) -> None:
        """Stop the Celery workers where they stand (SIGSTOP); their queue waits for them."""
        for name, proc in self.procs.items():
            if name.startswith("worker"):
                proc.pause()

    def resume_workers(self) -> None:
        for name, proc in self.procs.items():
            if name.startswith("worker"):
                proc.resume()

    def stop_proc(self, name: str) -> None:
        self.supervisor.stop(name, seconds=20)

    def stop(self) -> None:
        self.supervisor.stop_all(20)

    def peak_rss_mb(self, name: str) -> float:
        """Peak resident memory (VmHWM) of the largest process in that process group."""
        return self.procs[name].peak_rss_mb()

    # -- the sandbox and the app -------------------------------------------------------------
    def sb(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        url = f"{self.sandbox_url}/_sandbox/{path}"
        response = (
            requests.post(url, json=payload, timeout=30)
            if payload is not None
            else requests.get(url, timeout=30)
        )
        response.raise_for_status()
        return response.json()

    def portal_names(self) -> list[str]:
        return list(self.sb("state")["portals"])

    def portal_state(self, name: str) -> dict[str, Any]:
        return self.sb(f"state?portal={name}")["portals"][name]

    def _post_frame(self, launched: dict[str, Any]) -> requests.Response:
        url = launched["url"].replace(self.env["B24_APP_BASE_URL"], self.web_url)
        return requests.post(url, data=launched["form"], timeout=60)

    def install(self, name: str) -> None:
        launched = self.sb(f"p/{name}/launch", {"user_id": 1, "installer": True})
        response = self._post_frame(launched)
        if response.status_code != 200:
            raise RuntimeError(f"install of {name} failed: {response.status_code}")
        self.sb(f"p/{name}/install_finish", {})

    def open_app(self, name: str, user_id: int) -> tuple[str, dict[str, Any]]:
        """Open the app as a user; returns (page token, the launch used)."""
        launched = self.sb(f"p/{name}/launch", {"user_id": user_id})
        response = self._post_frame(launched)
        if response.status_code != 200:
            raise RuntimeError(f"open app on {name} failed: {response.status_code}")
        match = re.search(r'data-token="([^"]+)"', response.text)
        if not match:
            raise RuntimeError("no page token in the page")
        if 'data-loading="1"' in response.text:  # a first open: the list comes from a worker
            self.wait_rows(match.group(1))
        return match.group(1), launched

    def wait_rows(self, token: str, seconds: float = 120) -> None:
        """Poll the page's rows endpoint, as its script does, until the list has landed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            answer = requests.get(
                f"{self.web_url}/flows/api/rows", headers={"X-Flowpins-Token": token}, timeout=30
            )
            if answer.status_code == 200 and not answer.json().get("loading"):
                return
            time.sleep(0.3)
        raise RuntimeError("the flow list did not arrive in time")

    def pin(self, token: str, flow_ids: list[int], pinned: bool) -> requests.Response:
        return requests.post(
            f"{self.web_url}/flows/api/pin",
            json={"flow_ids": flow_ids, "pinned": pinned},
            headers={"X-Flowpins-Token": token},
            timeout=30,
        )

    def reset(self) -> None:
        """Back to the sandbox's seed state and an empty app database/Redis."""
        import redis

        self.sb("reset", {})
        keys = [
            k
            for pattern in ("fp:*", "flowpins:*")
            for k in redis.Redis.from_url(self.env["REDIS_URL"]).scan_iter(match=pattern)
        ]
        if keys:
            redis.Redis.from_url(self.env["REDIS_URL"]).delete(*keys)
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "TRUNCATE b24app_portal, b24app_portaluser, b24app_restcall, "
                "flows_flow, flows_pinintent CASCADE"
            )
