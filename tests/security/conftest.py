"""Fixtures for the security suite: an attacker's server that records whatever reaches it, and
a snapshot of everything a forged request could change."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from b24app.models import Portal, PortalUser
from flows.models import Flow, PinIntent
from tests.helpers import settle_background_work
from tests.security.publicnet import public_net  # noqa: F401  (a fixture)


class Recorder:
    """An HTTP server standing in for an attacker's "OAuth server": it answers nothing useful
    and keeps every request it gets (the app must never send it a token, or anything)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((self.command, self.path, body))
                payload = b'{"result": {"client_id": "x"}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _record

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attacker() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.close()


def stored_state() -> Any:
    """Everything of ours a request from Bitrix24 (or someone posing as it) can change."""
    settle_background_work()
    return (
        sorted(
            Portal.objects.values_list(
                "member_id",
                "state",
                "application_token",
                "domain",
                "client_endpoint",
                "server_endpoint",
                "installer_user_id",
            )
        ),
        sorted(
            PortalUser.objects.values_list(
                "portal__member_id",
                "user_id",
                "state",
                "token_version",
                "access_token",
                "refresh_token",
                "is_admin",
            )
        ),
        sorted(Flow.objects.values_list("portal__member_id", "flow_id", "name")),
        sorted(PinIntent.objects.values_list("portal__member_id", "user_id", "flow_id", "desired")),
    )
