"""Fixtures for the sandbox's own tests: no Django, no Redis - just the simulated portal.

Run with ``pytest tests/sandbox -p no:django``. Every test gets a fresh in-process
:class:`~sandbox.server.SandboxServer` on a free port, with distinct hosts where the platform
has them (Linux: alpha on 127.0.0.2, beta on 127.0.0.3, ...).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests

from sandbox.server import SandboxServer

CLIENT_ID = "local.sandbox0000000001"
CLIENT_SECRET = "sandbox-client-secret"
TIMEOUT = 10


@pytest.fixture(autouse=True)
def _clean_redis() -> None:
    """Shadow the project-wide autouse Redis cleanup: these tests need no Redis."""


class SandboxClient:
    """Thin helpers over the sandbox's HTTP interfaces."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.url = server.url

    def origin(self, portal: str = "alpha") -> str:
        return self.server.origin(portal)

    def endpoint(self, portal: str = "alpha") -> str:
        """The portal's ``client_endpoint`` (``{origin}/p/NAME/rest/``)."""
        return self.server.client_endpoint(portal)

    # control API
    def control(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}/_sandbox/{path}"
        if payload is None:
            response = requests.get(url, timeout=TIMEOUT)
        else:
            response = requests.post(url, json=payload, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    def state(self, portal: str = "alpha") -> dict[str, Any]:
        data = self.control(f"state?portal={portal}")
        return next(iter(data["portals"].values()))

    def config(self, **knobs: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.control("config", knobs)
        return result

    def launch(self, portal: str = "alpha", user_id: int = 1, **extra: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.control(f"p/{portal}/launch", {"user_id": user_id, **extra})
        return result

    def tokens(self, portal: str = "alpha", user_id: int = 1) -> dict[str, Any]:
        result: dict[str, Any] = self.control(f"p/{portal}/tokens", {"user_id": user_id})
        return result

    def token(self, portal: str = "alpha", user_id: int = 1) -> str:
        return str(self.tokens(portal, user_id)["access_token"])

    # portal REST
    def call(
        self, method: str, token: str | None, portal: str = "alpha", **params: Any
    ) -> requests.Response:
        body = dict(params)
        if token is not None:
            body["auth"] = token
        return requests.post(
            f"{self.endpoint(portal)}{method}",
            json=body,
            timeout=TIMEOUT,
            allow_redirects=False,
        )

    def result(self, method: str, token: str, portal: str = "alpha", **params: Any) -> Any:
        response = self.call(method, token, portal, **params)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    # OAuth server
    def refresh(
        self, refresh_token: str, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET
    ) -> requests.Response:
        return requests.get(
            f"{self.url}/oauth/token/",
            params={
                "grant_type": "refresh_token",
                "client_id": client_id,
                "client_secret": client_secret,
                "refresh_token": refresh_token,
            },
            timeout=TIMEOUT,
        )


@pytest.fixture
def srv() -> Iterator[SandboxServer]:
    server = SandboxServer(host="127.0.0.1", port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sb(srv: SandboxServer) -> SandboxClient:
    return SandboxClient(srv)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    form: dict[str, str] = field(default_factory=dict)


class Receiver:
    """A tiny local HTTP server that records POSTs (stands in for the app's event handler)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8")
                receiver.requests.append(
                    Received(
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                        form=dict(parse_qsl(body, keep_blank_values=True)),
                    )
                )
                payload = b"OK"
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    try:
        yield rec
    finally:
        rec.close()
