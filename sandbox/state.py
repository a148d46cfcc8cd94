"""The sandbox's mutable state: portals, knobs, tokens and the installed app.

Everything lives in one :class:`SandboxState` guarded by a single re-entrant lock
(``state.lock``). Request handlers take the lock for the short in-memory work and release it
before sleeping (latency knob) or talking to the network (event delivery).

The pieces live next door: the records in :mod:`sandbox.model`, the seed in
:mod:`sandbox.seed`, knobs in :mod:`sandbox.knobs`, addresses and lookup in
:mod:`sandbox.addresses`, the control API's view in :mod:`sandbox.snapshot`.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from . import snapshot as _snapshot
from .addresses import PortalAddresses, loopback_host, seed_hosts
from .knobs import GLOBAL_ONLY_KNOBS, KnobError, Knobs, coerce_knob
from .model import APP_STATUS, Portal, TokenPair
from .seed import seed_names, seed_portal
from .traffic import Traffic

__all__ = [
    "DEFAULT_APP_URL",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "SandboxState",
    "loopback_host",
    "seed_hosts",
]

DEFAULT_CLIENT_ID = "local.sandbox0000000001"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret"  # noqa: S105 - a well-known test value
DEFAULT_APP_URL = "http://127.0.0.1:8000"


class SandboxState(PortalAddresses):
    """All mutable sandbox data. Take ``lock`` around any read-modify-write.

    With ``distinct_hosts`` every portal has its own loopback host (``portal.host``) on
    ``portal_port``: its origin is ``http://<host>:<portal_port>`` and requests for its pages or
    REST must arrive on that host (:meth:`locate`). ``bind_host`` is called for a host a rename
    moves a portal to (the server binds a listener there; it may raise :class:`OSError`).
    Without it, every portal shares ``base_url`` as before.
    """

    def __init__(
        self,
        *,
        base_url: str,
        app_url: str = DEFAULT_APP_URL,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        portals: int = 2,
        knobs: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        distinct_hosts: bool = False,
        portal_port: int | None = None,
        base_host: str | None = None,
        bind_host: Callable[[str], None] | None = None,
    ) -> None:
        if portals < 1:
            raise ValueError("portals must be >= 1")
        self.lock = threading.RLock()
        self.base_url = base_url.rstrip("/")
        self.app_url = app_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.portal_count = portals
        self.clock = clock
        base = urlsplit(self.base_url)
        self.distinct_hosts = distinct_hosts
        self.base_host = base_host or base.hostname or "127.0.0.1"
        self.portal_port = portal_port or base.port or (443 if base.scheme == "https" else 80)
        self.bind_host = bind_host or (lambda host: None)
        self.renames = 0
        self._initial_knobs = Knobs(**{k: coerce_knob(k, v) for k, v in (knobs or {}).items()})
        self.knobs = self._initial_knobs
        self.portal_knobs: dict[str, dict[str, Any]] = {}  # by member_id
        self.portals: dict[str, Portal] = {}
        self.aliases: dict[str, str] = {}
        self.access_tokens: dict[str, TokenPair] = {}
        self.refresh_tokens: dict[str, TokenPair] = {}
        self.oauth_unknown_failures = 0
        self.traffic = Traffic()
        self.rng = random.Random(self.knobs.seed)  # noqa: S311 - reproducible fault injection
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------------

    def reset(self, keep_knobs: bool = False) -> None:
        """Back to the seed: same names, member_ids and hosts, no tokens, counters zero."""
        with self.lock:
            if not keep_knobs:
                self.knobs = self._initial_knobs
                self.portal_knobs = {}
            names = seed_names(self.portal_count)
            hosts = seed_hosts(self.portal_count) if self.distinct_hosts else []
            self.portals = {name: seed_portal(name) for name in names}
            for index, portal in enumerate(self.portals.values()):
                portal.host = hosts[index] if hosts else self.base_host
            self.aliases = {}
            self.renames = 0
            self.access_tokens = {}
            self.refresh_tokens = {}
            self.oauth_unknown_failures = 0
            self.traffic.reset()
            self.rng = random.Random(self.knobs.seed)  # noqa: S311

    # -- knobs ---------------------------------------------------------------------------------

    def knobs_for(self, portal: Portal | None) -> Knobs:
        if portal is None:
            return self.knobs
        overrides = self.portal_knobs.get(portal.member_id)
        return replace(self.knobs, **overrides) if overrides else self.knobs

    def set_knobs(self, values: dict[str, Any], portal: Portal | None = None) -> None:
        """Set knobs globally, or per portal (``None`` removes a portal override)."""
        coerced: dict[str, Any] = {}
        removals: list[str] = []
        for name, value in values.items():
            if portal is not None and name in GLOBAL_ONLY_KNOBS:
                raise KnobError(f"knob {name!r} is global only")
            if portal is not None and value is None:
                coerce_knob(name, getattr(Knobs(), name))  # validates the name
                removals.append(name)
                continue
            coerced[name] = coerce_knob(name, value)
        if portal is None:
            self.knobs = replace(self.knobs, **coerced)
            if "seed" in coerced:
                self.rng = random.Random(self.knobs.seed)  # noqa: S311
            return
        table = self.portal_knobs.setdefault(portal.member_id, {})
        table.update(coerced)
        for name in removals:
            table.pop(name, None)

    def roll(self, ratio: float) -> bool:
        """True with probability ``ratio`` (seeded; call with the lock held)."""
        if ratio <= 0:
            return False
        return self.rng.random() < ratio

    # -- tokens --------------------------------------------------------------------------------

    def issue_tokens(self, portal: Portal, user_id: int) -> TokenPair:
        knobs = self.knobs_for(portal)
        now = self.clock()
        pair = TokenPair(
            access_token=secrets.token_hex(32),
            refresh_token=secrets.token_hex(32),
            member_id=portal.member_id,
            user_id=user_id,
            client_id=self.client_id,
            scope=knobs.scope,
            issued_at=now,
            access_expires_at=now + knobs.token_ttl,
            refresh_expires_at=now + knobs.refresh_ttl,
        )
        self.access_tokens[pair.access_token] = pair
        self.refresh_tokens[pair.refresh_token] = pair
        portal.counters.tokens_issued += 1
        return pair

    def token_body(self, pair: TokenPair, portal: Portal) -> dict[str, Any]:
        """The OAuth server's token response (refresh / code exchange)."""
        now = self.clock()
        return {
            "access_token": pair.access_token,
            "expires": int(pair.access_expires_at),
            "expires_in": max(int(round(pair.access_expires_at - now)), 0),
            "scope": pair.scope,
            "domain": self.oauth_domain,
            "server_endpoint": self.server_endpoint,
            "status": APP_STATUS,
            "client_endpoint": self.client_endpoint(portal),
            "member_id": portal.member_id,
            "user_id": pair.user_id,
            "refresh_token": pair.refresh_token,
        }

    def check_access_token(self, token: str) -> tuple[str, TokenPair | None]:
        """Return ``("ok"|"expired"|"unknown", pair)`` for an access token."""
        pair = self.access_tokens.get(token)
        if pair is None:
            return "unknown", None
        if pair.access_killed or self.clock() >= pair.access_expires_at:
            return "expired", pair
        return "ok", pair

    def revoke_portal_tokens(self, portal: Portal) -> int:
        """Forget every token of a portal (uninstall): they become unknown everywhere."""
        doomed = [p for p in self.access_tokens.values() if p.member_id == portal.member_id]
        for pair in doomed:
            self.access_tokens.pop(pair.access_token, None)
            self.refresh_tokens.pop(pair.refresh_token, None)
        return len(doomed)

    def expire_tokens(self, portal: Portal, user_id: int | None = None) -> int:
        """Force-expire live access tokens (refresh tokens keep working)."""
        count = 0
        for pair in self.access_tokens.values():
            if pair.member_id != portal.member_id or pair.access_killed:
                continue
            if user_id is not None and pair.user_id != user_id:
                continue
            pair.access_killed = True
            count += 1
        return count

    def live_token_count(self, portal: Portal) -> int:
        now = self.clock()
        return sum(
            1
            for p in self.access_tokens.values()
            if p.member_id == portal.member_id and not p.access_killed and now < p.access_expires_at
        )

    # -- installed app -------------------------------------------------------------------------

    @staticmethod
    def new_application_token() -> str:
        return secrets.token_hex(16)

    def ensure_application_token(self, portal: Portal) -> str:
        if not portal.application_token:
            portal.application_token = self.new_application_token()
        return portal.application_token

    def record_pin(
        self, portal: Portal, user_id: int, flow_id: int, value: bool, source: str
    ) -> None:
        portal.pin_log.append(
            {
                "ts": round(self.clock(), 3),
                "user_id": user_id,
                "flow_id": flow_id,
                "pinned": value,
                "source": source,
            }
        )

    # -- snapshot ------------------------------------------------------------------------------

    def portal_snapshot(self, portal: Portal) -> dict[str, Any]:
        return _snapshot.portal_snapshot(self, portal)

    def snapshot(self, portal_name: str | None = None) -> dict[str, Any]:
        return _snapshot.snapshot(self, portal_name)
