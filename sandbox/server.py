"""HTTP routing and the :class:`SandboxServer` entry point.

URL layout (one process hosts the OAuth server and every portal):

* ``{base}/oauth/token/``            OAuth token endpoint (GET or POST)
* ``{base}/rest/app.info``           the OAuth server's trusted app.info (``server_endpoint``)
* ``{base}/p/NAME/rest/<method>``    portal REST (``client_endpoint`` = ``{base}/p/NAME/rest/``)
* ``{base}/p/NAME/``                 the portal page for people
* ``{base}/_sandbox/...``            control API (see :mod:`sandbox.control`)

Usage::

    with SandboxServer(port=0, portals=2, rate=50) as srv:
        print(srv.url, srv.state.portals["alpha"].member_id)
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .control import handle_control
from .oauth import handle_server_rest, handle_token
from .pages import render_index, render_portal_page
from .rest import handle_portal_rest
from .state import DEFAULT_APP_URL, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxState
from .wire import Reply, Request

MAX_BODY = 16 * 1024 * 1024


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default listen backlog (5) resets connections when dozens of workers call at once;
    # a real portal does not, so neither may the sandbox.
    request_queue_size = 256
    sandbox_state: SandboxState


class SandboxHandler(BaseHTTPRequestHandler):
    """Reads the request, routes it, writes the :class:`Reply` (or drops the connection)."""

    protocol_version = "HTTP/1.1"
    server_version = "Bitrix24Sandbox/1.0"
    disable_nagle_algorithm = True  # headers and body are separate writes; avoid ACK stalls
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    server: _HTTPServer
    verbose = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_OPTIONS(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    # -- plumbing ------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
                size = int(size_line or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ValueError as exc:
            self._send(Reply.error(413, "INVALID_REQUEST", str(exc)))
            self.close_connection = True
            return
        split = urlsplit(self.path)
        request = Request(
            method=self.command if self.command != "HEAD" else "GET",
            path=split.path,
            query=split.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        try:
            reply = route(self.server.sandbox_state, request)
        except Exception as exc:  # pragma: no cover - a bug in the sandbox itself
            self.log_error("sandbox error: %r", exc)
            reply = Reply.error(500, "SANDBOX_ERROR", f"{type(exc).__name__}: {exc}")
        if reply.drop:
            self._drop()
            return
        self._send(reply)

    def _drop(self) -> None:
        """Close the connection without writing a single byte (a lost response)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, reply: Reply) -> None:
        payload = reply.encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def route(state: SandboxState, req: Request) -> Reply:
    path = req.path
    if path in ("/oauth/token", "/oauth/token/"):
        return handle_token(state, req)
    if path.startswith("/rest/"):
        return handle_server_rest(state, path[len("/rest/") :], req)
    if path.startswith("/_sandbox/"):
        return handle_control(state, path[len("/_sandbox/") :], req)
    if path.startswith("/p/"):
        return _portal_path(state, req)
    if path == "/":
        with state.lock:
            return Reply.html(200, render_index(state))
    return Reply.error(404, "NOT_FOUND", f"Nothing at {path}")


def _portal_path(state: SandboxState, req: Request) -> Reply:
    name, _, rest = req.path[len("/p/") :].partition("/")
    if rest.startswith("rest/"):
        return handle_portal_rest(state, name, rest[len("rest/") :], req)
    with state.lock:
        portal, new_name = state.resolve(name)
        if new_name is not None:
            location = f"{state.base_url}/p/{new_name}/{rest}"
            return Reply.redirect(location + (f"?{req.query}" if req.query else ""))
        if portal is None:
            return Reply.html(404, "<!doctype html><title>404</title><h1>No such portal</h1>")
        if rest != "":
            return Reply.html(404, "<!doctype html><title>404</title><h1>Not found</h1>")
        if not req.path.endswith("/"):
            return Reply.redirect(
                f"{state.base_url}/p/{portal.name}/" + (f"?{req.query}" if req.query else "")
            )
        query = parse_qs(req.query)

        def first(key: str, default: str = "") -> str:
            return query.get(key, [default])[0]

        user_text = first("user", "1")
        return Reply.html(
            200,
            render_portal_page(
                state,
                portal,
                user_id=int(user_text) if user_text.isdigit() else 1,
                lang=first("lang"),
                auto_open=first("open") in ("1", "true", "yes"),
                installer=first("installer") in ("1", "true", "yes"),
                placement=first("placement", "DEFAULT").upper() or "DEFAULT",
            ),
        )


class SandboxServer:
    """The sandbox as a library: ``start()`` serves in a daemon thread, ``stop()`` ends it.

    ``port=0`` picks a free port; ``url`` is known right after construction. Extra keyword
    arguments are global knobs (see :class:`sandbox.state.Knobs`), e.g. ``rate=100``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        app_url: str = DEFAULT_APP_URL,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        portals: int = 2,
        *,
        base_url: str | None = None,
        verbose: bool = False,
        **knobs: Any,
    ) -> None:
        handler = type("BoundSandboxHandler", (SandboxHandler,), {"verbose": verbose})
        self._httpd = _HTTPServer((host, port), handler)
        bound_host, bound_port = self._httpd.server_address[:2]
        shown_host = "127.0.0.1" if bound_host in ("0.0.0.0", "") else str(bound_host)  # noqa: S104
        self.url = (base_url or f"http://{shown_host}:{bound_port}").rstrip("/")
        self.port = int(bound_port)
        self.state = SandboxState(
            base_url=self.url,
            app_url=app_url,
            client_id=client_id,
            client_secret=client_secret,
            portals=portals,
            knobs=knobs,
        )
        self._httpd.sandbox_state = self.state
        self._thread: threading.Thread | None = None

    def portal_url(self, name: str) -> str:
        return f"{self.url}/p/{name}/"

    def client_endpoint(self, name: str) -> str:
        return f"{self.url}/p/{name}/rest/"

    def start(self) -> SandboxServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"sandbox-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread (the CLI uses :meth:`start` + a signal wait instead)."""
        self._httpd.serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
