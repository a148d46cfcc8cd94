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
        if not k.startswith(
            ("B24_", "DJANGO_", "DATABASE_", "REDIS_", "FLOWPINS_", "PYTEST", "SECURE_")
        )
        and k not in {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "PORT"}
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("missing", ["SECRET_KEY", "B24_TOKEN_KEY", "B24_CLIENT_SECRET"])
def test_start_up_outside_debug_names_the_missing_secret(missing: str, tmp_path: Path) -> None:
    proc = _check(_production_env(tmp_path, **{missing: ""}))
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
            [sys.executable, "-m", "devtools", "run"],
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


def _production_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """A complete, valid production configuration, with `values` on top (empty = unset)."""
    good = {
        "SECRET_KEY": "k" * 20 + "-a-long-random-looking-secret-for-this-test-only",
        "B24_TOKEN_KEY": "dGVzdC10b2tlbi1rZXktdGhpcnR5LXR3by1ieXRlcyE=",
        "B24_CLIENT_ID": "app.0123456789abcd.01234567",
        "B24_CLIENT_SECRET": "s",
        "ALLOWED_HOSTS": "flowpins.example.com",
        "B24_APP_BASE_URL": "https://flowpins.example.com",
    }
    good.update(values)
    env = _clean_env(DEBUG="0", FLOWPINS_ENV_FILE=os.devnull, FLOWPINS_VAR_DIR=str(tmp_path))
    env.update({k: v for k, v in good.items() if v})
    return env


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _example_value(name: str) -> str:
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} is not in .env.example")


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"SECRET_KEY": "change-me"}, "SECRET_KEY is a published placeholder"),
        ({"SECRET_KEY": "example"}, "SECRET_KEY is a published placeholder"),
        ({"SECRET_KEY": "django-insecure-" + "x" * 50}, "SECRET_KEY is a published placeholder"),
        ({"SECRET_KEY": "Xq3v9LpT2mWz8RkY4nHs"}, "SECRET_KEY is too short (20 characters)"),
        ({"B24_TOKEN_KEY": "change-me"}, "B24_TOKEN_KEY key #1 is not a Fernet key"),
        ({"B24_TOKEN_KEY": "example"}, "B24_TOKEN_KEY key #1 is not a Fernet key"),
        (
            {"B24_TOKEN_KEY": "dGVzdC10b2tlbi1rZXktdGhpcnR5LXR3by1ieXRlcyE=,old-passphrase"},
            "B24_TOKEN_KEY key #2 is not a Fernet key",
        ),
        ({"B24_APP_BASE_URL": ""}, "B24_APP_BASE_URL is not set"),
        ({"B24_APP_BASE_URL": "http://flowpins.example.com"}, "must start with https://"),
        ({"B24_APP_BASE_URL": "https://127.0.0.1:8000"}, "must name a public host"),
        ({"B24_APP_BASE_URL": "https://localhost"}, "must name a public host"),
    ],
)
def test_start_up_outside_debug_refuses_placeholders_and_unreachable_handlers(
    tmp_path: Path, values: dict[str, str], words: str
) -> None:
    # Whatever .env.example suggests is public, hence refused.
    values = {k: _example_value(k) if v == "example" else v for k, v in values.items()}
    proc = _check(_production_env(tmp_path, **values))
    assert proc.returncode != 0
    assert words in proc.stderr, proc.stderr[-800:]
    for name, value in values.items():  # the refusal never echoes the secret itself
        if name in {"SECRET_KEY", "B24_TOKEN_KEY"}:
            assert value not in proc.stderr


def test_start_up_outside_debug_accepts_a_real_configuration(tmp_path: Path) -> None:
    proc = _check(_production_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-800:]
    # http (and loopback) handler URLs only with the sandbox switch on.
    sandbox = _production_env(
        tmp_path, B24_APP_BASE_URL="http://127.0.0.1:8000", B24_ALLOW_HTTP="1"
    )
    assert _check(sandbox).returncode == 0


def test_django_deploy_checks_are_clean_under_production_settings(tmp_path: Path) -> None:
    """HSTS, the https redirect, secure cookies, DEBUG off...: Django's own deployment checklist
    has nothing to say (only the HSTS subdomain/preload advice is silenced, see settings)."""
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=_production_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout
    assert "WARNING" not in proc.stdout + proc.stderr


def test_the_dockerfile_collectstatic_step_passes_the_start_up_checks(tmp_path: Path) -> None:
    """The image runs collectstatic at build time with DEBUG=0: the same command, here."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    command = next(
        line.strip()[len("RUN ") :]
        for line in text.splitlines()
        if line.startswith("RUN ") and "collectstatic" in line
    )
    env = _clean_env(FLOWPINS_ENV_FILE=os.devnull, FLOWPINS_VAR_DIR=str(tmp_path))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        ["sh", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-800:]
