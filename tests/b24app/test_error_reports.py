"""Error reports: with SENTRY_DSN set, an error in a web request and one in a Celery task of the
real worker reach Sentry, and no report holds a token, a secret or a frame POST field's value.

Sentry is a small HTTP server on 127.0.0.1 that records every envelope the SDK sends over its
real transport; the raw (decompressed) bytes are searched for every secret in several encodings.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import requests
import sentry_sdk
from django.conf import settings
from django.http import HttpResponse
from django.test import Client

from b24app import placements
from b24app.celery import app as celery_app
from b24app.errorreports import init_sentry
from b24app.models import Portal, PortalUser
from b24app.placements import FrameRequest, Placement
from devtools.procs import worker_command
from devtools.supervisor import start
from tests.faults.stack import wait_until
from tests.helpers import frame_path, install, launch, open_app

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

USER = 2
BROKEN = "FLOWPINS_TEST_BROKEN"
QUEUE = "flowpins-error-reports-test"  # only this test's worker consumes it


@dataclass
class Recorder:
    """A stand-in for sentry.io: records each envelope's decompressed bytes."""

    port: int = 0
    envelopes: list[bytes] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return f"http://0123456789abcdef0123456789abcdef@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict[str, Any]]:
        """The error events among the envelopes' items."""
        found = []
        for raw in list(self.envelopes):
            lines = raw.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found


def _decoded(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]

        return bytes(brotli.decompress(body))
    return body


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    found = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            found.envelopes.append(_decoded(body, self.headers.get("Content-Encoding", "")))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()


def forms(secret: str) -> set[str]:
    """The ways a secret could be written into a report."""
    raw = secret.encode()
    found = {
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    if len(secret) >= 32:  # a part of a long random token is as telling (a truncated value)
        found |= {secret[:16], secret[-16:]}
    return found


def leaks(envelopes: list[bytes], secrets: dict[str, str]) -> list[str]:
    return [
        name
        for name, secret in secrets.items()
        if secret and any(form.encode() in raw for raw in envelopes for form in forms(secret))
    ]


def broken_placement(request: FrameRequest) -> HttpResponse:
    """A feature's view with a bug, as careless as can be: it logs a token, keeps them in its
    locals and puts them (and the app's client secret) in the exception's message."""
    import logging

    frame = request.frame
    access, refresh, app_token = frame.access_token, frame.refresh_token, frame.application_token
    logging.getLogger("flows.broken").warning("calling the portal with %s", refresh)
    raise RuntimeError(
        f"the portal refused auth {access} (app {app_token}, refresh {refresh}) "
        f"for the client {settings.B24_CLIENT_SECRET}; metrics {settings.METRICS_TOKEN}"
    )


def test_an_error_in_a_frame_request_is_reported_without_any_secret(
    sandbox: Any, recorder: Recorder, live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real WSGI server (the live server thread): Sentry's WSGI layer adds the URL,
    the query and the headers to the report, as under gunicorn."""
    install(Client(), sandbox)
    page = open_app(Client(), sandbox, USER)  # a page token, sent along in its header
    monkeypatch.setitem(placements._REGISTRY, BROKEN, Placement(BROKEN, broken_placement))
    # words joined by dashes: not shaped like a token, so only knowing it hides it
    monkeypatch.setattr(settings, "METRICS_TOKEN", "scrape-only-with-this-0123456789-words")
    launched = launch(sandbox, "alpha", USER)
    access = launched["form"]["AUTH_ID"]
    form = {
        **launched["form"],
        "PLACEMENT": BROKEN,
        "PLACEMENT_OPTIONS": json.dumps({"ID": "17", "note": access}),
    }
    recorder.envelopes.clear()
    init_sentry(recorder.dsn)
    try:
        answer = requests.post(
            f"{live_server.url}{frame_path(launched)}&auth={access}",
            data=form,
            headers={
                "Authorization": f"Bearer {access}",
                "X-Flowpins-Token": page,
                "Cookie": f"sessionid={launched['form']['REFRESH_ID']}",
            },
            timeout=30,
        )
        sentry_sdk.flush(timeout=10)
    finally:
        sentry_sdk.get_client().close(timeout=10)
        sentry_sdk.get_global_scope().set_client(None)
    assert answer.status_code == 500
    [event] = [e for e in recorder.events() if _exception_type(e) == "RuntimeError"]
    # Still a useful report: the request's address, method and fields, and its request id.
    request = event["request"]
    assert (request["url"], request["method"]) == (f"{live_server.url}/b24/app/", "POST")
    assert {"AUTH_ID", "member_id", "PLACEMENT"} <= set(request["data"])
    assert "LANG=" in request["query_string"]
    assert event["tags"]["request_id"] == answer.headers["X-Request-ID"]
    assert event["tags"]["member_id"] == launched["form"]["member_id"]
    secrets = {
        "AUTH_ID": access,
        "REFRESH_ID": launched["form"]["REFRESH_ID"],
        "APPLICATION_TOKEN": launched["form"]["APPLICATION_TOKEN"],
        "page token": page,
        **_process_secrets(),
    }
    assert not leaks(recorder.envelopes, secrets), leaks(recorder.envelopes, secrets)


@pytest.fixture
def reporting_worker(
    worker_env: dict[str, str], recorder: Recorder, tmp_path: Path
) -> Iterator[None]:
    """A real worker with SENTRY_DSN set, on a queue of its own."""
    hostname = f"reports-{uuid.uuid4().hex[:6]}@%h"
    cmd = worker_command(concurrency=2, hostname=hostname, queue=QUEUE, quiet=True)
    env = {**worker_env, "SENTRY_DSN": recorder.dsn, "SENTRY_ENVIRONMENT": "test"}
    proc = start("celery worker", cmd, env=env, log=tmp_path / "worker.log")
    try:
        proc.wait_for_log("ready.", 40)
        yield
    finally:
        proc.stop(signal.SIGTERM)


def test_an_error_in_a_task_of_the_worker_is_reported_without_any_secret(
    sandbox: Any, recorder: Recorder, reporting_worker: None
) -> None:
    client = Client()
    install(client, sandbox)
    open_app(client, sandbox, USER)
    portal = Portal.objects.get()
    user = PortalUser.objects.get(portal=portal, user_id=USER)
    recorder.envelopes.clear()
    # A publisher's bug: the user's tokens where the task's ids belong. Django's error names
    # the value it could not use as an id ("expected a number but got '…'").
    sent = celery_app.send_task(
        "flows.add_flow",
        kwargs={"portal_id": user.refresh_token, "user_id": user.access_token, "flow_id": 1},
        queue=QUEUE,
    )

    def reported() -> list[dict[str, Any]]:
        return [
            e
            for e in recorder.events()
            if e.get("tags", {}).get("celery_task_id") == sent.id
            and _exception_type(e) == "ValueError"
        ]

    [event] = wait_until(reported, 30, "the worker's error report")
    assert event["extra"]["celery-job"]["task_name"] == "flows.add_flow"
    secrets = {
        "access token": user.access_token,
        "refresh token": user.refresh_token,
        "application token": portal.application_token,
        **_process_secrets(),
    }
    assert not leaks(recorder.envelopes, secrets), leaks(recorder.envelopes, secrets)


def _exception_type(event: dict[str, Any]) -> str:
    values = (event.get("exception") or {}).get("values") or [{}]
    return str(values[-1].get("type", ""))


def _process_secrets() -> dict[str, str]:
    return {
        "client secret": settings.B24_CLIENT_SECRET,
        "SECRET_KEY": settings.SECRET_KEY,
        "B24_TOKEN_KEY": settings.B24_TOKEN_KEY,
        "METRICS_TOKEN": settings.METRICS_TOKEN,
    }
