"""HTTP routing and the :class:`SandboxServer` entry point.

URL layout (one process hosts the OAuth server and every portal):

* ``{base}/oauth/token/``            OAuth token endpoint (GET or POST)
* ``{base}/rest/app.info``           the OAuth server's trusted app.info (``server_endpoint``)
* ``{origin}/p/NAME/rest/<method>``  portal REST (``client_endpoint``)
* ``{origin}/p/NAME/``               the portal page for people
* ``{base}/_sandbox/...``            control API (see :mod:`sandbox.control`)
* ``{base}/``                        index of the portals

``{base}`` is ``http://127.0.0.1:PORT``. With distinct hosts (the default on Linux) every portal
has its own origin on the same port: the N-th seed portal (0-based) is served on
``http://127.0.0.{N+2}:PORT`` and a rename moves it to ``127.1.0.2``, ``127.1.0.3``, ... (see
:func:`sandbox.addresses.loopback_host`). One listening socket per host, all accepted by one
``selectors`` thread; each connection is then served in its own thread (as
``ThreadingHTTPServer`` does). A portal's page or REST asked on any other host is a 404 "wrong
host"; the portal is chosen by the connection's local address, never by the ``Host`` header.
Without distinct hosts every portal lives under ``{base}``.

Usage::

    with SandboxServer(port=0, portals=2, rate=50) as srv:
        print(srv.url, srv.portal_url("alpha"), srv.state.portals["alpha"].member_id)
"""

from __future__ import annotations

import selectors
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .addresses import seed_hosts
from .control import handle_control
from .oauth import handle_server_rest, handle_token
from .pages import render_index, render_portal_page
from .rest import handle_portal_rest, wrong_host
from .state import DEFAULT_APP_URL, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxState
from .wire import Reply, Request

MAX_BODY = 16 * 1024 * 1024
ACCEPTS_PER_WAKEUP = 64
BIND_ATTEMPTS = 8  # port=0: another process may hold the port on a portal host; pick again


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default listen backlog (5) resets connections when dozens of workers call at once;
    # a real portal does not, so neither may the sandbox.
    request_queue_size = 256
    sandbox_state: SandboxState

    def server_bind(self) -> None:
        """``HTTPServer.server_bind`` without ``getfqdn``: a reverse DNS lookup per portal host
        can take seconds (200 portals, 200 lookups)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


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
            local_host=self._local_host(),
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

    def _local_host(self) -> str:
        try:
            return str(self.connection.getsockname()[0])
        except OSError:
            return ""

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
    if path.startswith("/_sandbox/"):  # on every host: the portal page calls it same-origin
        return handle_control(state, path[len("/_sandbox/") :], req)
    if path.startswith("/p/"):
        return _portal_path(state, req)
    if not state.serves_base(req.local_host):
        return _portal_host_other(state, req)
    if path in ("/oauth/token", "/oauth/token/"):
        return handle_token(state, req)
    if path.startswith("/rest/"):
        return handle_server_rest(state, path[len("/rest/") :], req)
    if path == "/":
        with state.lock:
            return Reply.html(200, render_index(state))
    return Reply.error(404, "NOT_FOUND", f"Nothing at {path}")


def _portal_host_other(state: SandboxState, req: Request) -> Reply:
    """A portal host serves only its portal: ``/`` leads to the page, the rest is 404."""
    with state.lock:
        portal = state.portal_on_host(req.local_host)
        if req.path == "/" and portal is not None:
            return Reply.redirect(state.page_url(portal))
        return Reply.error(
            404,
            "NOT_FOUND",
            f"Nothing at {req.path} on a portal host; the OAuth server is {state.base_url}",
        )


def _portal_path(state: SandboxState, req: Request) -> Reply:
    name, _, rest = req.path[len("/p/") :].partition("/")
    if rest.startswith("rest/"):
        return handle_portal_rest(state, name, rest[len("rest/") :], req)
    with state.lock:
        found, portal = state.locate(req.local_host, name)
        if found == "moved" and portal is not None:
            return Reply.redirect(state.location(portal, rest, req.query))
        if found == "wrong_host" and portal is not None and state.serves_base(req.local_host):
            # A person who types the base address gets the page on the portal's own host;
            # REST on a wrong host stays a 404, so the app must use the address it was given.
            return Reply.redirect(state.location(portal, rest, req.query))
        if found == "wrong_host":
            return wrong_host(state, name, req.local_host, portal)
        if portal is None:
            return Reply.html(404, "<!doctype html><title>404</title><h1>No such portal</h1>")
        if rest != "":
            return Reply.html(404, "<!doctype html><title>404</title><h1>Not found</h1>")
        if not req.path.endswith("/"):
            return Reply.redirect(state.location(portal, "", req.query))
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


class Listeners:
    """Listening sockets on one port, one per loopback host, accepted by ONE selector thread.

    Each accepted connection is handed to its listener's ``process_request`` (a thread per
    connection, ``ThreadingHTTPServer`` semantics). :meth:`add` may be called from any thread
    while serving: the socket listens at once and joins the selector on the loop's next turn.
    """

    def __init__(self, handler: type[SandboxHandler]) -> None:
        self._handler = handler
        self._servers: dict[str, _HTTPServer] = {}
        self._pending: list[_HTTPServer] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.state: SandboxState | None = None

    def hosts(self) -> list[str]:
        with self._lock:
            return list(self._servers)

    def server(self, host: str) -> _HTTPServer:
        with self._lock:
            return self._servers[host]

    def add(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (idempotent per host); returns the bound address."""
        with self._lock:
            server = self._servers.get(host)
            if server is None:
                server = _HTTPServer((host, port), self._handler)
                server.socket.setblocking(False)
                if self.state is not None:
                    server.sandbox_state = self.state
                self._servers[host] = server
                self._pending.append(server)
        self._wake()
        bound_host, bound_port = server.server_address[:2]
        return str(bound_host), int(bound_port)

    def attach(self, state: SandboxState) -> None:
        with self._lock:
            self.state = state
            for server in self._servers.values():
                server.sandbox_state = state

    def serve_forever(self) -> None:
        self._idle.clear()
        try:
            while not self._stop.is_set():
                self._register_pending()
                for key, _mask in self._selector.select(timeout=0.5):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._accept(key.data)
        finally:
            self._idle.set()

    def shutdown(self) -> None:
        """Stop the loop and wait for it to finish (it is not closed: see :meth:`close`)."""
        self._stop.set()
        self._wake()
        self._idle.wait(timeout=5)

    def close(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
            self._pending.clear()
        for server in servers:
            server.server_close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _register_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for server in pending:
            self._selector.register(server.socket, selectors.EVENT_READ, server)

    def _accept(self, server: _HTTPServer) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                request, client_address = server.get_request()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            request.setblocking(True)
            try:
                server.process_request(request, client_address)
            except Exception:  # pragma: no cover - thread start failure
                server.handle_error(request, client_address)
                server.shutdown_request(request)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # buffer full (a wake-up is pending anyway) or closed
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass


def distinct_hosts_default(host: str) -> bool:
    """Distinct hosts need 127.0.0.0/8 on the loopback interface: Linux has it, macOS not."""
    return sys.platform.startswith("linux") and host == "127.0.0.1"


class SandboxServer:
    """The sandbox as a library: ``start()`` serves in a daemon thread, ``stop()`` ends it.

    ``port=0`` picks a free port; ``url`` is known right after construction. Extra keyword
    arguments are global knobs (see :class:`sandbox.knobs.Knobs`), e.g. ``rate=100``.
    ``distinct_hosts`` gives every portal its own loopback host on the same port (``None``: on
    when the platform is Linux, ``host`` is 127.0.0.1 and no ``base_url`` is given).
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
        distinct_hosts: bool | None = None,
        **knobs: Any,
    ) -> None:
        if distinct_hosts is None:
            distinct_hosts = base_url is None and distinct_hosts_default(host)
        elif distinct_hosts and host != "127.0.0.1":
            raise ValueError("distinct_hosts needs host 127.0.0.1 (portals get 127.x.y.z)")
        self.distinct_hosts = distinct_hosts
        handler = type("BoundSandboxHandler", (SandboxHandler,), {"verbose": verbose})
        self._listeners = self._bind(handler, host, port, seed_hosts(portals))
        self.port = self._main_port
        # The main listener; every listener shares its RequestHandlerClass (tests flip
        # ``RequestHandlerClass.verbose`` on it to log every request line).
        self._httpd = self._listeners.server(host)
        shown_host = "127.0.0.1" if self._main_host in ("0.0.0.0", "") else self._main_host  # noqa: S104
        self.url = (base_url or f"http://{shown_host}:{self.port}").rstrip("/")
        self.state = SandboxState(
            base_url=self.url,
            app_url=app_url,
            client_id=client_id,
            client_secret=client_secret,
            portals=portals,
            knobs=knobs,
            distinct_hosts=distinct_hosts,
            portal_port=self.port,
            base_host=self._main_host,
            bind_host=self._bind_host,
        )
        self._listeners.attach(self.state)
        self._thread: threading.Thread | None = None

    def _bind(
        self, handler: type[SandboxHandler], host: str, port: int, portal_hosts: list[str]
    ) -> Listeners:
        """The main listener plus one per seed portal host (all on the main port)."""
        for attempt in range(BIND_ATTEMPTS if port == 0 else 1):
            listeners = Listeners(handler)
            try:
                self._main_host, self._main_port = listeners.add(host, port)
                for portal_host in portal_hosts if self.distinct_hosts else []:
                    listeners.add(portal_host, self._main_port)
            except OSError:
                listeners.close()
                if attempt == BIND_ATTEMPTS - 1 or port != 0:
                    raise
                continue
            return listeners
        raise AssertionError("unreachable")  # pragma: no cover

    def _bind_host(self, host: str) -> None:
        self._listeners.add(host, self.port)

    @property
    def hosts(self) -> list[str]:
        """Every address a listener is bound to (the main one first)."""
        return self._listeners.hosts()

    def portal_url(self, name: str) -> str:
        """The portal page (current address; an old name gives the renamed portal's)."""
        with self.state.lock:
            portal = self.state.portal_by_name_or_alias(name)
            return self.state.page_url(portal) if portal else f"{self.url}/p/{name}/"

    def client_endpoint(self, name: str) -> str:
        with self.state.lock:
            portal = self.state.portal_by_name_or_alias(name)
            return self.state.client_endpoint(portal) if portal else f"{self.url}/p/{name}/rest/"

    def origin(self, name: str) -> str:
        """``scheme://host:port`` of a portal (the base URL without distinct hosts)."""
        with self.state.lock:
            portal = self.state.portal_by_name_or_alias(name)
            if portal is None:
                raise KeyError(name)
            return self.state.origin(portal)

    def start(self) -> SandboxServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._listeners.serve_forever,
                name=f"sandbox-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread (the CLI uses :meth:`start` + a signal wait instead)."""
        self._listeners.serve_forever()

    def stop(self) -> None:
        self._listeners.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._listeners.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
