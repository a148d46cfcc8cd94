"""The foundation: settings refuse to start without secrets, /healthz tells the truth, and
`make run`'s launcher brings up web + worker + a private broker and stops them all on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from django.test import Client

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("B24_", "DJANGO_", "DATABASE_", "REDIS_", "FLOWPINS_", "PYTEST"))
        and k not in {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "PORT"}
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("missing", ["SECRET_KEY", "B24_TOKEN_KEY", "B24_CLIENT_SECRET"])
def test_start_up_outside_debug_names_the_missing_secret(missing: str, tmp_path: Path) -> None:
    values = {
        "SECRET_KEY": "x",
        "B24_TOKEN_KEY": "y",
        "B24_CLIENT_ID": "c",
        "B24_CLIENT_SECRET": "s",
        "ALLOWED_HOSTS": "example.com",
    }
    del values[missing]
    env = _clean_env(
        DEBUG="0", FLOWPINS_ENV_FILE=os.devnull, FLOWPINS_VAR_DIR=str(tmp_path), **values
    )
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert f"{missing} is not set" in proc.stderr


def test_healthz_ok_when_database_and_broker_answer(db: None) -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_healthz_503_names_the_broker_when_it_is_down(db: None, settings) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{dead_port}/0"
    response = Client().get("/healthz")
    assert response.status_code == 503
    assert response.json()["down"] == ["broker"]
    assert "broker" in response.json()["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_run_launcher_serves_with_a_live_worker_and_stops_everything(tmp_path: Path) -> None:
    """The zero-set-up path: no DATABASE_URL, no REDIS_URL — SQLite and a private Redis."""
    port = _free_port()
    env = _clean_env(
        PORT=str(port),
        FLOWPINS_VAR_DIR=str(tmp_path),
        FLOWPINS_ENV_FILE=os.devnull,
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "b24app.devrun", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                if health.status_code == 200 and "ready." in log_path.read_text():
                    break
            except requests.RequestException:  # not up yet, or slow on a loaded machine
                pass
            time.sleep(0.5)
        output = log_path.read_text()
        assert health is not None and health.status_code == 200, output[-3000:]
        assert "ready." in output, "the Celery worker never got ready:\n" + output[-3000:]
        assert f"http://127.0.0.1:{port}/b24/install/" in output
        assert f"http://127.0.0.1:{port}/b24/events/" in output
        assert (tmp_path / "flowpins.sqlite3").exists()
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        assert len(children.stdout.split()) >= 3  # redis, web, worker
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # a failed assertion: stop it the way a person would, then hard
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                leftovers = subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()
                for pid in leftovers:
                    os.killpg(int(pid), signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
    # every process it started (web, worker, redis) is gone
    time.sleep(0.5)
    for pid in children.stdout.split():
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        ), f"process {pid} survived Ctrl-C"


def test_every_setting_is_documented_in_env_example_and_readme() -> None:
    import re

    source = (ROOT / "b24app" / "settings.py").read_text()
    names = set(re.findall(r'env\.\w+\(\s*"([A-Z0-9_]+)"', source))
    names |= set(re.findall(r'_secret\("([A-Z0-9_]+)"\)', source))
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "B24_TOKEN_KEY"} <= names
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    undocumented = sorted(n for n in names if f"{n}=" not in example or n not in readme)
    assert undocumented == []
