"""A portal's state as its administrators and the engineer on call see it: the REST budget used,
how many users are active or must reopen the app, the app's bindings as the portal reports them,
and whether a user is an administrator (the portal's own `user.admin` answer, kept briefly).

`manage.py portals` and the admin's section of the flows page both read their figures here.
Reads are selectors; `learn_admin` and `read_bindings` call the portal and run in a worker.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from b24app import placements
from b24app.bitrix.client import PortalClient
from b24app.bitrix.errors import BitrixError, ReinstallRequired, ReopenRequired
from b24app.lifecycle import EVENT_HANDLERS, handler_url
from b24app.models import Portal, PortalUser, RestCall
from b24app.problems import Problem
from b24app.redisconn import redis_client
from b24app.tokens import call_with_user

log = logging.getLogger(__name__)

# What Bitrix24 answers when it refuses a request for its rate limit (HTTP 503).
LIMITED = "QUERY_LIMIT_EXCEEDED"


@dataclass(frozen=True)
class RestUsage:
    """REST requests to one portal in a window, from the call log (a batch is one request)."""

    calls: int
    commands: int  # what those requests carried: a batch counts its commands
    errors: int
    limited: int  # refused for the rate limit (503 QUERY_LIMIT_EXCEEDED)
    last: datetime | None


def rest_usage(member_id: str, since: datetime) -> RestUsage:
    stats = RestCall.objects.filter(member_id=member_id, created_at__gte=since).aggregate(
        calls=Count("id"),
        commands=Coalesce(Sum("commands"), 0),
        errors=Count("id", filter=~Q(error="")),
        limited=Count("id", filter=Q(error=LIMITED)),
        last=Max("created_at"),
    )
    return RestUsage(
        stats["calls"], stats["commands"], stats["errors"], stats["limited"], stats["last"]
    )


def today_start() -> datetime:
    """Midnight of today in the server's time zone (TIME_ZONE), the start of "today"."""
    return timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)


# Per portal (`Portal.objects.annotate(active=ACTIVE_USERS, reopen=REOPEN_USERS)`): its users
# who are active, and those who must reopen the app.
ACTIVE_USERS = Count("users", filter=Q(users__state=PortalUser.State.ACTIVE))
REOPEN_USERS = Count("users", filter=Q(users__state=PortalUser.State.NEEDS_REOPEN))


def user_counts(portal: Portal) -> tuple[int, int]:
    """(active, must reopen) users of the portal."""
    counted = Portal.objects.filter(pk=portal.pk).annotate(active=ACTIVE_USERS, reopen=REOPEN_USERS)
    row = counted.values("active", "reopen").first() or {"active": 0, "reopen": 0}
    return int(row["active"]), int(row["reopen"])


# --- who is an administrator: the portal's answer, kept briefly --------------------------------


def _admin_key(portal_id: int, user_id: int) -> str:
    return f"fp:admin:{portal_id}:{user_id}"


def admin_answer(portal_id: int, user_id: int) -> bool | None:
    """What the portal last said of this user (`user.admin`), while it is trusted; None when
    it was not asked, or too long ago."""
    raw = redis_client().get(_admin_key(portal_id, user_id))
    return None if raw is None else raw == b"1"


def _yes(result: Any) -> bool:
    return result is True or str(result).lower() in {"true", "1", "y"}


def learn_admin(portal_id: int, user_id: int) -> bool | None:
    """Ask the portal, with this user's own token, whether they are an administrator, and keep
    the answer: a yes for FLOWPINS_ADMIN_CHECK_SECONDS (a demoted admin loses the view that
    soon), a no for FLOWPINS_NON_ADMIN_CHECK_SECONDS (each user's open costs the portal one
    request that often at most). None: the user's tokens cannot be used (nothing is kept).
    Transient errors (rate limit, outage) are raised for the task to retry."""
    user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
    if user is None:
        return None
    try:
        result = call_with_user(
            user, lambda client, token: client.call("user.admin", token=token).result
        )
    except (ReopenRequired, ReinstallRequired):
        return None
    admin = _yes(result)
    if admin:
        seconds = settings.FLOWPINS_ADMIN_CHECK_SECONDS
    else:
        seconds = settings.FLOWPINS_NON_ADMIN_CHECK_SECONDS
    redis_client().set(_admin_key(portal_id, user_id), b"1" if admin else b"0", ex=seconds)
    # The stored flag picks whose token binds the handlers (tokens.admin_user): keep it true.
    PortalUser.objects.filter(pk=user.pk).exclude(is_admin=admin).update(is_admin=admin)
    return admin


# --- the app's bindings, as the portal reports them ---------------------------------------------


@dataclass(frozen=True)
class Binding:
    kind: str  # "placement" or "event"
    code: str  # the placement code or the event name
    handler: str


@dataclass(frozen=True)
class Bindings:
    """What `placement.get` and `event.get` answered (admin only), and when."""

    fetched_at: float
    found: list[Binding] = field(default_factory=list)
    problem: str = ""  # why they could not be read (a Problem code); nothing found then
    # The re-binding (its click's time) this read answers: the read that followed it, or any
    # read begun after that one landed.
    rebind_at: float | None = None

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.fetched_at)

    def missing(self) -> list[Binding]:
        """The bindings install makes that the portal does not report."""
        if self.problem:
            return []
        return [b for b in expected_bindings() if b not in self.found]


def expected_bindings() -> list[Binding]:
    """Every binding install makes (`lifecycle.portal_bind_handlers`)."""
    app, events = handler_url("app"), handler_url("events")
    return [Binding("placement", p.code, app) for p in placements.bound()] + [
        Binding("event", name, events) for name in EVENT_HANDLERS
    ]


def _bindings_key(portal_id: int) -> str:
    return f"fp:admin_bindings:{portal_id}"


# How long a read of the bindings is kept (the section shows its age).
BINDINGS_KEEP_SECONDS = 24 * 3600


def stored_bindings(portal_id: int) -> Bindings | None:
    raw = redis_client().get(_bindings_key(portal_id))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        found = [Binding(*item) for item in data["found"]]
        rebind_at = data.get("rebind_at")
        return Bindings(
            float(data["fetched_at"]),
            found,
            str(data["problem"]),
            None if rebind_at is None else float(rebind_at),
        )
    except (ValueError, TypeError, KeyError):
        return None


def _read(client: PortalClient, token: str) -> list[Binding]:
    answer = client.batch(
        {"placements": ("placement.get", {}), "events": ("event.get", {})}, token=token
    )
    if answer.errors:
        raise next(iter(answer.errors.values()))
    found: list[Binding] = []
    for item in answer.results.get("placements") or []:
        if isinstance(item, dict):
            code = str(item.get("placement") or item.get("PLACEMENT") or "")
            found.append(Binding("placement", code, str(item.get("handler") or "")))
    for item in answer.results.get("events") or []:
        if isinstance(item, dict) and str(item.get("offline", 0)) in {"0", "", "False"}:
            found.append(Binding("event", str(item.get("event") or ""), str(item.get("handler"))))
    return found


def read_bindings(portal_id: int, user_id: int, rebind_at: float | None = None) -> Bindings | None:
    """Ask the portal which handlers of the app are bound, with this administrator's token, and
    keep the answer. A refusal is kept as a problem; transient errors are raised (retried).

    `rebind_at`: this is the read that follows the re-binding clicked then. Another read keeps
    the last re-binding it follows, unless it began before the kept read landed (it may have
    read the portal before that re-binding): then the kept read stays."""
    user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
    if user is None:
        return None
    started = time.time()
    try:
        found, problem = call_with_user(user, _read), ""
    except BitrixError as exc:
        if exc.transient:
            raise
        log.info("portal %s: could not read the app's bindings: %s", portal_id, exc.code)
        found, problem = [], exc.problem or Problem.GAVE_UP
    if rebind_at is None:
        kept = stored_bindings(portal_id)
        if kept is not None and kept.fetched_at > started:
            return kept
        rebind_at = kept.rebind_at if kept is not None else None
    bindings = Bindings(time.time(), found, problem, rebind_at)
    payload = {
        "fetched_at": bindings.fetched_at,
        "found": [[b.kind, b.code, b.handler] for b in found],
        "problem": problem,
        "rebind_at": rebind_at,
    }
    redis_client().set(_bindings_key(portal_id), json.dumps(payload), ex=BINDINGS_KEEP_SECONDS)
    return bindings
