"""Where portals are served: loopback hosts, origins, endpoints, lookup and renames.

With distinct hosts every portal has its own loopback host on the sandbox's port; without,
every portal lives under ``base_url``. :class:`PortalAddresses` is the part of
:class:`sandbox.state.SandboxState` that answers "which address" and "which portal".
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from .model import Portal
from .seed import seed_names

SEED_HOST_BLOCK = 0  # seed portals live on 127.0.x.y
RENAME_HOST_BLOCK = 1  # renamed portals move to 127.1.x.y
_HOSTS_PER_OCTET = 253  # .2 .. .254 of every /24


def loopback_host(block: int, index: int) -> str:
    """The ``index``-th portal address of a block: ``127.<block>.<index // 253>.<2 + index % 253>``.

    Block 0 holds the seed portals in seed order (alpha 127.0.0.2, beta 127.0.0.3, ...), block 1
    the hosts renames move portals to (127.1.0.2, 127.1.0.3, ...). Linux routes all of
    127.0.0.0/8 to the loopback interface, so these bind without any setup.
    """
    third, fourth = divmod(index, _HOSTS_PER_OCTET)
    if index < 0 or third > 255:
        raise ValueError(f"no loopback address #{index} in block {block}")
    return f"127.{block}.{third}.{2 + fourth}"


def _old_address(portal: Portal, host: str | None, name: str) -> bool:
    """Is (host, name) a past address of ``portal`` (old host and/or old name)?"""
    hosts_match = host is None or host == portal.host or host in portal.old_hosts
    names_match = name == portal.name or name in portal.old_names
    return hosts_match and names_match and (host, name) != (portal.host, portal.name)


def seed_hosts(count: int) -> list[str]:
    """The hosts of the seed portals of ``SandboxState(portals=count)``, in seed order."""
    return [loopback_host(SEED_HOST_BLOCK, i) for i in range(len(seed_names(count)))]


class PortalAddresses:
    """Addresses and portal lookup; mixed into :class:`sandbox.state.SandboxState`."""

    base_url: str
    base_host: str
    portal_port: int
    distinct_hosts: bool
    bind_host: Callable[[str], None]
    renames: int  # rename hosts handed out since the last reset
    portals: dict[str, Portal]
    aliases: dict[str, str]  # old name -> current name

    @property
    def server_endpoint(self) -> str:
        return f"{self.base_url}/rest/"

    @property
    def oauth_domain(self) -> str:
        return urlsplit(self.base_url).netloc

    def origin(self, portal: Portal) -> str:
        """``scheme://host:port`` the portal is served on (``base_url`` without distinct hosts)."""
        if not self.distinct_hosts:
            return self.base_url
        return f"http://{portal.host}:{self.portal_port}"

    def domain(self, portal: Portal) -> str:
        """``DOMAIN`` / ``auth[domain]`` / ``install.domain``.

        With distinct hosts it is the portal's ``host:port``, so ``PROTOCOL://DOMAIN`` is the
        portal's origin, as on Bitrix24 (BX24.js posts to the parent frame at that origin).
        Without, the display domain ``NAME.sandbox.localhost``.
        """
        if not self.distinct_hosts:
            return portal.domain
        return urlsplit(self.origin(portal)).netloc

    def protocol(self, portal: Portal) -> str:
        """The launch query's ``PROTOCOL``: 1 for https."""
        return "1" if self.origin(portal).startswith("https:") else "0"

    def portal_uri(self, portal: Portal) -> str:
        """app.info's ``install.uri``."""
        return self.origin(portal) if self.distinct_hosts else f"http://{portal.domain}"

    def client_endpoint(self, portal: Portal) -> str:
        return f"{self.origin(portal)}/p/{portal.name}/rest/"

    def page_url(self, portal: Portal) -> str:
        return f"{self.origin(portal)}/p/{portal.name}/"

    def location(self, portal: Portal, rest: str, query: str = "") -> str:
        """``{origin}/p/NAME/{rest}[?query]``: where a moved address redirects to."""
        return f"{self.origin(portal)}/p/{portal.name}/{rest}" + (f"?{query}" if query else "")

    def serves_base(self, host: str) -> bool:
        """Whether a request that arrived on ``host`` may reach the OAuth server and index."""
        return not self.distinct_hosts or host == self.base_host

    def portal_on_host(self, host: str) -> Portal | None:
        if not self.distinct_hosts:
            return None
        return next((p for p in self.portals.values() if p.host == host), None)

    # -- lookup --------------------------------------------------------------------------------

    def locate(self, host: str, name: str) -> tuple[str, Portal | None]:
        """Route ``/p/NAME/...`` that arrived on local address ``host``.

        Returns ``("ok", portal)``; ``("moved", portal)`` for an old host and/or old name of a
        renamed portal (answer 302 to :meth:`location`); ``("wrong_host", portal_or_None)`` when
        the name is known but this host is not (one of) the portal's; ``("missing", None)``.
        Without distinct hosts the host is ignored (renames are by name only).
        """
        checked = host if self.distinct_hosts else None
        portal = self.portals.get(name)
        if portal is not None and checked in (None, portal.host):
            return "ok", portal
        for candidate in (self.portal_by_name_or_alias(name), self._old_host_owner(checked)):
            if candidate is not None and _old_address(candidate, checked, name):
                return "moved", candidate
        if portal is not None or name in self.aliases:
            return "wrong_host", portal or self.portal_by_name_or_alias(name)
        return "missing", None

    def _old_host_owner(self, host: str | None) -> Portal | None:
        if host is None:
            return None
        return next((p for p in self.portals.values() if host in p.old_hosts), None)

    def resolve(self, name: str) -> tuple[Portal | None, str | None]:
        """Find a portal by current name; for an old (renamed) name return the new name."""
        portal = self.portals.get(name)
        if portal is not None:
            return portal, None
        new_name = self.aliases.get(name)
        if new_name is not None and new_name in self.portals:
            return None, new_name
        return None, None

    def portal_by_name_or_alias(self, name: str) -> Portal | None:
        portal, new_name = self.resolve(name)
        if portal is None and new_name is not None:
            portal = self.portals[new_name]
        return portal

    def portal_by_member(self, member_id: str) -> Portal | None:
        for portal in self.portals.values():
            if portal.member_id == member_id:
                return portal
        return None

    def rename(self, portal: Portal, new_name: str) -> None:
        """Rename; with distinct hosts the portal also moves to a new host (may raise OSError)."""
        new_host = self._allocate_rename_host() if self.distinct_hosts else portal.host
        old = portal.name
        del self.portals[old]
        self.aliases.pop(new_name, None)
        for alias, target in list(self.aliases.items()):
            if target == old:
                self.aliases[alias] = new_name
        self.aliases[old] = new_name
        portal.old_names.append(old)
        if new_host != portal.host:
            portal.old_hosts.append(portal.host)
            portal.host = new_host
        portal.name = new_name
        self.portals[new_name] = portal

    def _allocate_rename_host(self) -> str:
        """The next free host of the rename block, with a listener bound (skips busy ones)."""
        failure: OSError | None = None
        for _ in range(16):
            host = loopback_host(RENAME_HOST_BLOCK, self.renames)
            self.renames += 1
            try:
                self.bind_host(host)
            except OSError as exc:
                failure = exc
                continue
            return host
        raise OSError(f"no rename host could be bound: {failure}")
