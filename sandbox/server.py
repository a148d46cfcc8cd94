"""The :class:`SandboxServer` entry point, and the URL layout it serves.

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

:mod:`sandbox.listeners` holds the sockets and the HTTP handler, :mod:`sandbox.routes` the
routing; this module starts and stops them.

Usage::

    with SandboxServer(port=0, portals=2, rate=50) as srv:
        print(srv.url, srv.portal_url("alpha"), srv.state.portals["alpha"].member_id)
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from .addresses import seed_hosts
from .listeners import Listeners, SandboxHandler
from .state import DEFAULT_APP_URL, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxState

BIND_ATTEMPTS = 8  # port=0: another process may hold the port on a portal host; pick again


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
