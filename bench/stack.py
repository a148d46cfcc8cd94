"""The whole system as separate processes for the benchmarks: the sandbox, gunicorn, Celery
workers, on a dedicated PostgreSQL database and Redis database. Loopback only."""

from __future__ import annotations

import base64
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from devtools.procs import free_port, worker_command

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "local.sandbox0000000001"
CLIENT_SECRET = "sandbox-client-secret"


def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


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
    def __init__(self, *, portals: int = 5, workers: int = 2, tmp: Path) -> None:
        self.portals = portals
        self.workers = workers
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
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
            DATABASE_URL=os.environ.get(
                "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/flowpins_bench"
            ),
            REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2"),
            PYTHONPATH=str(ROOT),
        )

    # -- processes ---------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

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
            self.start_worker(f"worker{n + 1}", 8)
        wait_http(f"{self.sandbox_url}/_sandbox/state")
        wait_http(f"{self.web_url}/ping")
        for n in range(self.workers):
            self.wait_worker(f"worker{n + 1}")

    def start_worker(self, name: str, concurrency: int, queue: str = "flowpins") -> None:
        """One Celery worker process with a pool of `concurrency` threads."""
        cmd = worker_command(
            concurrency=concurrency, hostname=f"{name}@%h", queue=queue, quiet=True
        )
        self._start(name, cmd)

    def wait_worker(self, name: str, seconds: float = 40) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if "ready." in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise RuntimeError(self.log(name)[-2000:])
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not get ready")

    def pause_workers(self) -> None:
        """Stop the Celery workers where they stand (SIGSTOP); their queue waits for them."""
        for name, proc in self.procs.items():
            if name.startswith("worker") and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGSTOP)

    def resume_workers(self) -> None:
        for name, proc in self.procs.items():
            if name.startswith("worker") and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)

    def stop_proc(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_proc(name)

    def peak_rss_mb(self, name: str) -> float:
        """Peak resident memory (VmHWM) of the largest process in that process group."""
        proc = self.procs[name]
        pids = subprocess.run(
            ["pgrep", "-g", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        peaks = []
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if match:
                peaks.append(int(match.group(1)) / 1024)
        return max(peaks) if peaks else 0.0

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
