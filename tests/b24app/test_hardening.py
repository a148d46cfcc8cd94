"""Production hardening: https only (but the health probe still gets through), a proxy's scheme
header believed only when configured, error reports without Bitrix24's secrets, and log lines
that a logged value cannot split."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
from django.conf import settings as django_settings
from django.core.signals import got_request_exception
from django.test import Client
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from b24app import eventauth, frame
from b24app.logging import RedactSecretsFilter
from devtools.procs import free_port
from tests.b24app.test_foundation import _production_env

ROOT = Path(__file__).resolve().parents[2]


def _django(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh process set up with `env`'s settings."""
    script = "import django, logging\ndjango.setup()\n" + code
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"DJANGO_SETTINGS_MODULE": "b24app.settings", **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- https ---------------------------------------------------------------------------------------

_REQUESTS = """
from django.test import Client
host = {"HTTP_HOST": "flowpins.example.com"}
for path, extra in [("/b24/app/", {}), ("/b24/app/", {"HTTP_X_FORWARDED_PROTO": "https"}),
                    ("/ping", {}), ("/healthz", {})]:
    r = Client().get(path, **host, **extra)
    print(path, extra.get("HTTP_X_FORWARDED_PROTO", "-"), r.status_code,
          r.get("Location", "-"), r.get("Strict-Transport-Security", "-"))
"""


def _answers(env: dict[str, str]) -> list[list[str]]:
    proc = _django(env, _REQUESTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line.split() for line in proc.stdout.splitlines()]


def test_production_redirects_http_to_https_except_the_health_probes(tmp_path: Path) -> None:
    env = _production_env(tmp_path, REDIS_URL=django_settings.REDIS_URL)
    app, forwarded, ping, healthz = _answers(env)
    assert app[2:4] == ["301", "https://flowpins.example.com/b24/app/"]
    # Nobody configured a proxy: a client's own X-Forwarded-Proto does not make http https.
    assert forwarded[2:4] == ["301", "https://flowpins.example.com/b24/app/"]
    assert ping[2] == "200"
    assert healthz[2] == "200"


def test_the_scheme_header_is_believed_once_a_proxy_is_configured(tmp_path: Path) -> None:
    env = _production_env(
        tmp_path,
        REDIS_URL=django_settings.REDIS_URL,
        SECURE_PROXY_SSL_HEADER_NAME="X-Forwarded-Proto",
    )
    app, forwarded, _, _ = _answers(env)
    assert app[2] == "301"  # plain http from the proxy is still sent to https
    assert forwarded[2] == "200"  # https at the proxy: served, with a year of HSTS
    assert forwarded[4] == "max-age=31536000"

    proc = _django(_production_env(tmp_path, SECURE_PROXY_SSL_HEADER_NAME="X_Proto: https"), "")
    assert proc.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER_NAME must be a header name" in proc.stderr


def test_the_container_health_probe_passes_against_production_settings(tmp_path: Path) -> None:
    """The Dockerfile's HEALTHCHECK against gunicorn with production settings: https redirect on,
    ALLOWED_HOSTS without 127.0.0.1."""
    port = free_port()
    env = _production_env(
        tmp_path, REDIS_URL=django_settings.REDIS_URL, PORT=str(port), PYTHONPATH=str(ROOT)
    )
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        web = subprocess.Popen(
            [gunicorn, "b24app.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        probe = None
        while time.monotonic() < deadline and web.poll() is None:
            probe = subprocess.run(
                [sys.executable, "-m", "b24app.probe"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if probe.returncode == 0 or "ConnectionRefused" not in probe.stderr:
                break
            time.sleep(0.3)
        assert probe is not None and probe.returncode == 0, (
            probe and probe.stderr,
            log.read_text(),
        )
        # What a probe without the right Host meets (why the probe names one).
        with pytest.raises(HTTPError) as plain:
            urlopen(Request(f"http://127.0.0.1:{port}/healthz"), timeout=5)  # noqa: S310
        assert plain.value.code == 400
    finally:
        web.terminate()
        web.wait(timeout=20)


# --- error reports -------------------------------------------------------------------------------

SECRETS = {
    "AUTH_ID": "auth-id-secret-value-1",
    "REFRESH_ID": "refresh-id-secret-value-2",
    "APPLICATION_TOKEN": "application-token-secret-3",
    "auth[access_token]": "event-access-secret-4",
    "auth[refresh_token]": "event-refresh-secret-5",
    "auth[application_token]": "event-app-token-secret-6",
}


@pytest.mark.parametrize(
    ("path", "form"),
    [
        (
            "/b24/app/",
            {"member_id": "m1", "AUTH_ID": "", "REFRESH_ID": "", "APPLICATION_TOKEN": ""},
        ),
        ("/b24/install/", {"member_id": "m1", "AUTH_ID": "", "REFRESH_ID": ""}),
        (
            "/b24/events/",
            {"event": "ONAPPUPDATE", "auth[access_token]": "", "auth[refresh_token]": ""},
        ),
        ("/b24/install/", {"event": "ONAPPUSERREADY", "auth[application_token]": ""}),
    ],
)
def test_an_error_report_never_shows_what_bitrix24_posted(
    path: str, form: dict[str, str], monkeypatch: pytest.MonkeyPatch, db: None
) -> None:
    form = {key: value or SECRETS[key] for key, value in form.items()}

    def broken(request: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug deep inside the view")

    monkeypatch.setattr(frame, "verify_frame_post", broken)
    monkeypatch.setattr(eventauth, "verify_event", broken)
    failed: list[tuple[Any, Any]] = []

    def keep(sender: Any, request: Any, **kwargs: Any) -> None:
        failed.append((request, sys.exc_info()))

    got_request_exception.connect(keep)
    try:
        response = Client(raise_request_exception=False).post(path, form)
    finally:
        got_request_exception.disconnect(keep)

    assert response.status_code == 500
    request, exc_info = failed[0]
    shown = SafeExceptionReporterFilter().get_post_parameters(request)
    assert set(shown) == set(form)
    # What the admins' error e-mail holds (AdminEmailHandler renders this report).
    report = ExceptionReporter(request, *exc_info).get_traceback_text()
    assert "a bug deep inside the view" in report and next(iter(form)) in report
    for key, value in form.items():
        assert value not in str(shown[key])
        assert value not in report, key


# --- log lines -----------------------------------------------------------------------------------


def test_a_logged_value_cannot_start_a_log_line_of_its_own() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecretsFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    log = logging.getLogger("tests.log-injection")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("refused event %s", "x\nFAKE LINE")
        log.warning("refused event %s", "y\r\nINFO root forged\x1b[2K\u2028z\x85!")
    finally:
        log.removeHandler(handler)

    lines = out.getvalue().splitlines()
    assert lines == [
        "WARNING tests.log-injection refused event x\\nFAKE LINE",
        "WARNING tests.log-injection refused event y\\r\\nINFO root forged\\x1b[2K\\u2028z\\x85!",
    ]


@pytest.mark.parametrize("process", ["web", "worker"])
def test_web_and_worker_logs_are_escaped_and_redacted(process: str, tmp_path: Path) -> None:
    """Through the logging each process really configures: Django's LOGGING in the web server;
    in a worker, Celery replaces the root handlers with its own when it sets up logging."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    code = (
        "from b24app.celery import app\napp.log.setup(loglevel='INFO')\n"
        if process == "worker"
        else ""
    )
    code += "logging.getLogger('b24app.x').warning('bad %s', 'x\\nFAKE LINE auth_id=zz-secret')\n"
    proc = _django(env, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "FAKE LINE" in line]
    assert len(lines) == 1 and "bad x\\nFAKE LINE" in lines[0], proc.stderr
    assert "zz-secret" not in proc.stderr


# --- numbers from outside ------------------------------------------------------------------------


class _OAuthServer:
    """An allow-listed OAuth server whose app.info names the user in non-ASCII digits."""

    def __init__(self, answer: dict[str, Any]) -> None:
        body = json.dumps(answer).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("user_id", ["²", "١٢", "--5", True])
def test_a_user_id_in_odd_digits_is_a_refusal_not_an_error(
    user_id: Any, settings: Any, db: None
) -> None:
    oauth_server = _OAuthServer(
        {
            "result": {
                "client_id": settings.B24_CLIENT_ID,
                "user_id": user_id,
                "install": {"member_id": "m1", "client_endpoint": "https://m1.bitrix24.com/rest/"},
            }
        }
    )
    settings.B24_OAUTH_SERVERS = [oauth_server.url + "/"]
    settings.B24_ALLOW_HTTP = True
    try:
        response = Client().post(
            "/b24/app/",
            {
                "member_id": "m1",
                "AUTH_ID": "a" * 32,
                "SERVER_ENDPOINT": oauth_server.url + "/rest/",
            },
        )
    finally:
        oauth_server.close()
    assert response.status_code == 403
    assert "did not say which user" in response.content.decode()


def test_a_portal_count_in_odd_digits_is_no_number() -> None:
    from b24app.bitrix.answers import int_or_none

    assert [int_or_none(v) for v in ["12", "-3", 7, "--5", "²", "1-", "", True, None]] == [
        12, -3, 7, None, None, None, None, None, None
    ]  # fmt: skip
