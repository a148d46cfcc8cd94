"""`make run` / `make demo`: the whole app on one machine with zero set-up.

Starts, as separate processes: a private Redis (only when REDIS_URL is unset), the web server
(gunicorn), a Celery worker and, for `demo`, the simulated Bitrix24 portal. Migrates first, prints
the handler URLs to paste into the Bitrix24 app registration form, and stops every process it
started on Ctrl-C (or when any of them dies).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from base64 import urlsafe_b64encode
from pathlib import Path
from types import FrameType

import environ

from devtools.procs import free_port, redis_command, worker_command
from devtools.supervisor import StartError, Supervisor

BASE_DIR = Path(__file__).resolve().parent.parent


def _local_secrets(var_dir: Path) -> dict[str, str]:
    """Local-run secrets, generated once and kept under var/ so stored tokens stay readable."""
    path = var_dir / "local-secrets.env"
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key and value:
                values[key.strip()] = value.strip()
    changed = False
    if "SECRET_KEY" not in values:
        values["SECRET_KEY"] = secrets.token_urlsafe(48)
        changed = True
    if "B24_TOKEN_KEY" not in values:
        values["B24_TOKEN_KEY"] = urlsafe_b64encode(secrets.token_bytes(32)).decode()
        changed = True
    if changed:
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    return values


def _environment() -> tuple[dict[str, str], Path]:
    """This process's environment (and .env under it) with the local-run defaults; the var dir."""
    env_file = os.environ.get("FLOWPINS_ENV_FILE", str(BASE_DIR / ".env"))
    if Path(env_file).is_file():
        environ.Env.read_env(env_file, overwrite=False)
    env = dict(os.environ)
    var_dir = Path(env.get("FLOWPINS_VAR_DIR", BASE_DIR / "var"))
    var_dir.mkdir(parents=True, exist_ok=True)
    env.setdefault("DEBUG", "1")
    for key, value in _local_secrets(var_dir).items():
        env.setdefault(key, value)
    port = int(env.setdefault("PORT", "8000"))
    env.setdefault("B24_APP_BASE_URL", f"http://127.0.0.1:{port}")
    if env["B24_APP_BASE_URL"].startswith("http://"):
        # Served over plain http here: outside DEBUG the https redirect would lock the browser out.
        env.setdefault("SECURE_SSL_REDIRECT", "0")
    return env, var_dir


def _metrics_dir(env: dict[str, str], var_dir: Path) -> None:
    """With METRICS_TOKEN set, every process writes its metrics to one directory (var/metrics),
    emptied here before any starts: files of an earlier run would add to this run's counts."""
    if not env.get("METRICS_TOKEN"):
        return
    directory = Path(env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(var_dir / "metrics")))
    directory.mkdir(parents=True, exist_ok=True)
    for kind in ("counter", "gauge", "histogram", "summary"):  # prometheus-client's files only
        for stale in directory.glob(f"{kind}_*.db"):
            stale.unlink()


def _start_redis(sup: Supervisor, env: dict[str, str], var_dir: Path) -> None:
    """A private Redis (persisted under var/redis) as the broker; sets REDIS_URL."""
    redis_port = free_port()
    redis_dir = var_dir / "redis"
    redis_dir.mkdir(exist_ok=True)
    sup.start("redis", redis_command(redis_port, redis_dir, persist=True), env).wait_for_port(
        redis_port
    )
    env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    print(f"[flowpins] private Redis (broker, locks, rate limits) on port {redis_port}")


def _start_sandbox(sup: Supervisor, env: dict[str, str]) -> str:
    """The simulated portal, allow-listed as the OAuth server; returns its URL."""
    sandbox_port = int(env.get("SANDBOX_PORT", "8090"))
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env["B24_OAUTH_SERVERS"] = f"{sandbox_url}/"
    env["B24_ALLOW_HTTP"] = "1"
    env["SANDBOX_APP_URL"] = env["B24_APP_BASE_URL"]
    env["SANDBOX_PORT"] = str(sandbox_port)
    env.setdefault("B24_CLIENT_ID", "local.sandbox0000000001")
    env.setdefault("B24_CLIENT_SECRET", "sandbox-client-secret")
    sup.start("sandbox", [sys.executable, "-m", "sandbox"], env)
    return sandbox_url


def _prepare_database(env: dict[str, str]) -> None:
    """Migrate; outside DEBUG also collect the static files whitenoise serves."""
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "--noinput"], env=env, cwd=BASE_DIR, check=True)
    if env.get("DEBUG", "").lower() not in ("1", "true", "yes", "on"):
        subprocess.run(
            [python, "manage.py", "collectstatic", "--noinput", "-v0"],
            env=env,
            cwd=BASE_DIR,
            check=True,
        )


def _web_command(host: str, port: int) -> list[str]:
    return [
        f"{Path(sys.executable).parent}/gunicorn",
        "b24app.wsgi",
        "--bind",
        f"{host}:{port}",
        "--workers",
        "2",
        "--threads",
        "4",
        "--access-logfile",
        "-",
        "--graceful-timeout",
        "5",
    ]


def _print_handlers(base: str, sandbox_url: str | None, metrics: bool = False) -> None:
    print(
        "\n[flowpins] running. Register the app in Bitrix24 (scopes: task, placement) with:\n"
        f"  Application URL (handler):      {base}/b24/app/\n"
        f"  Application installer URL:      {base}/b24/install/\n"
        f"  Event handler URL:              {base}/b24/events/\n"
        f"  Health:                         {base}/healthz\n"
        + (f"  Metrics (Bearer METRICS_TOKEN): {base}/metrics\n" if metrics else ""),
        flush=True,
    )
    if sandbox_url is not None:
        print(
            f"[flowpins] sandbox portal: {sandbox_url}/p/alpha/  (install the app there first,"
            " then open it as any user)\n",
            flush=True,
        )
    print("[flowpins] Ctrl-C stops everything.", flush=True)


def _watch(sup: Supervisor, stopping: list[bool]) -> int:
    """Until Ctrl-C (0) or until one of the processes dies (its code, at least 1)."""
    while not stopping:
        exited = sup.first_exit()
        if exited is not None:
            name, code = exited
            print(f"[flowpins] {name} exited with code {code}; stopping", flush=True)
            return code or 1
        time.sleep(0.3)
    return 0


def _serve(sup: Supervisor, mode: str, env: dict[str, str], var_dir: Path) -> int:
    if not env.get("REDIS_URL"):
        try:
            _start_redis(sup, env, var_dir)
        except StartError:
            print("[flowpins] the private Redis did not start", flush=True)
            return 1
    sandbox_url = _start_sandbox(sup, env) if mode == "demo" else None
    _metrics_dir(env, var_dir)
    _prepare_database(env)
    port = int(env["PORT"])
    web = sup.start("web", _web_command(env.get("HOST", "127.0.0.1"), port), env)
    sup.start("worker", worker_command(), env)
    try:
        web.wait_for_port(port, 30)
    except StartError:
        print("[flowpins] the web server did not start", flush=True)
        return 1
    _print_handlers(env["B24_APP_BASE_URL"], sandbox_url, bool(env.get("METRICS_TOKEN")))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools")
    parser.add_argument("mode", choices=["run", "demo"], nargs="?", default="run")
    args = parser.parse_args(argv)
    env, var_dir = _environment()
    sup = Supervisor(cwd=BASE_DIR)
    stopping: list[bool] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        code = _serve(sup, args.mode, env, var_dir)
        return code or _watch(sup, stopping)
    finally:
        sup.stop_all(
            10,
            on_kill=lambda name: print(
                f"[flowpins] {name} did not stop in time; killing it", flush=True
            ),
        )


if __name__ == "__main__":
    sys.exit(main())
