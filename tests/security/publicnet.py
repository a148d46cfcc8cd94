"""Production's network shape, kept on loopback: an https OAuth server at a public address.

With B24_ALLOW_HTTP off the app talks only to https servers whose addresses are public, so a
test of the production rules needs one. The app reaches "the internet" through an egress proxy
(HTTPS_PROXY / HTTP_PROXY, which `requests` honours): the proxy tunnels the public OAuth
server's address to a TLS server on 127.0.0.1, and answers every other destination 502 after
writing down what was asked. Nothing leaves the machine, and the proxy's log shows every host
the app tried to reach. The certificate is made for the public address and trusted through
REQUESTS_CA_BUNDLE, for this test only.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import select
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Public (global unicast) addresses the app is told about; the proxy never connects to them.
OAUTH_ADDRESS = "93.184.216.34"
OAUTH_BASE = f"https://{OAUTH_ADDRESS}/"


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for OAUTH_ADDRESS: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, OAUTH_ADDRESS)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(OAUTH_ADDRESS))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "oauth.pem", directory / "oauth.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class PublicOAuth:
    """The https OAuth server: answers app.info with `install` (what it vouches for)."""

    client_id: str
    install: dict[str, Any] = field(default_factory=dict)
    user_id: int = 1
    asked: list[str] = field(default_factory=list)  # the paths asked, in order

    def answer(self, path: str) -> dict[str, Any]:
        self.asked.append(path)
        if path != "/rest/app.info":
            return {"error": "NOT_FOUND", "error_description": "not served here"}
        return {
            "result": {
                "client_id": self.client_id,
                "user_id": self.user_id,
                "install": {"installed": True, "status": "L", **self.install},
            }
        }


def _tls_server(oauth: PublicOAuth, cert: Path, key: Path) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            parse_qs(self.rfile.read(length).decode())  # the token: read, never kept
            body = json.dumps(oauth.answer(self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def _pipe(a: socket.socket, b: socket.socket) -> None:
    sockets = [a, b]
    while True:
        ready, _, _ = select.select(sockets, [], [], 10)
        if not ready:
            return
        for sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            (b if sock is a else a).sendall(data)


class EgressProxy(socketserver.ThreadingTCPServer):
    """CONNECT to OAUTH_ADDRESS:443 is tunnelled to the local TLS server; anything else is
    written down (its request line) and answered 502."""

    daemon_threads = True

    def __init__(self, tls_port: int) -> None:
        self.tls_port = tls_port
        self.asked: list[str] = []
        super().__init__(("127.0.0.1", 0), self._handler())

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(8192).decode("latin-1").strip()
                while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                proxy.asked.append(line)
                if line.startswith(f"CONNECT {OAUTH_ADDRESS}:443 "):
                    with socket.create_connection(("127.0.0.1", proxy.tls_port)) as upstream:
                        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        self.wfile.flush()
                        _pipe(self.connection, upstream)
                    return
                self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

        return Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@dataclass
class PublicNet:
    oauth: PublicOAuth
    proxy: EgressProxy

    def destinations(self) -> list[str]:
        """Every request line the app sent to the proxy (CONNECT host:port, or a URL)."""
        return [line.split(" ")[1] for line in self.proxy.asked if " " in line]


@pytest.fixture
def public_net(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> Iterator[PublicNet]:
    """Production rules (https, public hosts, the public OAuth server allow-listed) for this
    test, with every outgoing request of this process going through the egress proxy except
    those to loopback (the sandbox's control API)."""
    cert, key = _certificate(tmp_path)
    oauth = PublicOAuth(client_id=settings.B24_CLIENT_ID)
    tls = _tls_server(oauth, cert, key)
    proxy = EgressProxy(tls.server_address[1])
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in (tls, proxy)
    ]
    for thread in threads:
        thread.start()
    for variable in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(variable, proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.0/8,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.0/8,localhost")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    settings.B24_ALLOW_HTTP = False
    settings.B24_OAUTH_SERVERS = [OAUTH_BASE]
    try:
        yield PublicNet(oauth, proxy)
    finally:
        for server in (proxy, tls):
            server.shutdown()
            server.server_close()
