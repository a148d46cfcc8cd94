"""Sockets: the listeners (one per loopback host, one selector thread) and the HTTP handler.

The handler reads a request, hands it to :func:`sandbox.routes.route` and writes the
:class:`~sandbox.wire.Reply` - or closes the connection without a byte for a dropped one.
"""

from __future__ import annotations

import selectors
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .routes import route
from .state import SandboxState
from .wire import Reply, Request

MAX_BODY = 16 * 1024 * 1024
ACCEPTS_PER_WAKEUP = 64


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
