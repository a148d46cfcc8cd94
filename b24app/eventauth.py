"""Verification of the lifecycle events Bitrix24 posts. Nothing here writes (beyond the REST
call log of the one `user.admin` question).

`auth[member_id]` must be a known portal and `auth[application_token]` must match — but every
user who opened the app has that token, so it proves "about this portal", not "sent by
Bitrix24". An event that installs, or replaces the stored application_token, also needs an
access token the OAuth server vouches for and the portal calls an admin's. An uninstall is
confirmed with the portal by the caller (see lifecycle.uninstall_verdict).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.http import HttpRequest, QueryDict

from b24app.bitrix import oauth
from b24app.frame import MEMBER_RE, require_admin, tokens_equal, vouch_for_token
from b24app.models import Portal
from b24app.problems import Refused

EVENTS = {"ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL"}
# Lifecycle events Bitrix24 may post that need nothing from us (ONAPPUSERREADY goes to the
# installer URL of every app): answered 200 and logged, with no side effect.
ACKNOWLEDGED = {"ONAPPUSERREADY", "ONAPPPAYMENT", "ONAPPMETHODCONFIRM", "ONAPPTEST"}
_EVENT_NAME_RE = re.compile(r"^[A-Z0-9_]{1,64}$")


@dataclass(frozen=True)
class VerifiedEvent:
    name: str
    member_id: str
    auth: dict[str, str]
    data: dict[str, str]
    portal: Portal | None  # None only for the first ONAPPINSTALL of a portal
    info: oauth.AppInfo | None  # set when the OAuth server vouched for the event's token
    new_application_token: bool = False  # the event replaces the stored application_token
    admin: bool | None = None  # True when the portal confirmed the token's owner is an admin


def _brackets(data: QueryDict, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in data:
        if key.startswith(prefix + "[") and key.endswith("]"):
            out[key[len(prefix) + 1 : -1]] = str(data.get(key, ""))[:2000]
    return out


def event_name(request: HttpRequest) -> str:
    """The event's name, refused unless form-encoded and made of A-Z, 0-9 and _."""
    if (request.content_type or "") != "application/x-www-form-urlencoded":
        raise Refused(400, "Events must be form-encoded, as Bitrix24 sends them.")
    name = str(request.POST.get("event", "")).strip().upper()
    if not name:
        raise Refused(400, "The request has no event name.")
    if not _EVENT_NAME_RE.match(name):
        raise Refused(400, "The event name is malformed.")
    return name


def verify_event(request: HttpRequest) -> VerifiedEvent:
    name = event_name(request)
    if name not in EVENTS and name not in ACKNOWLEDGED:
        raise Refused(400, f"This app does not handle the event {name}.")
    data = request.POST
    auth = _brackets(data, "auth")
    payload = _brackets(data, "data")
    if any("\x00" in text for part in (auth, payload) for item in part.items() for text in item):
        # Bitrix24 never sends one, and PostgreSQL text (the stored scope, endpoints) cannot
        # hold it: refused here rather than failing at the database.
        raise Refused(400, "The event holds a NUL character.")
    member_id = auth.get("member_id", "")
    if not member_id or not MEMBER_RE.match(member_id):
        raise Refused(400, "The event has no valid auth[member_id].")
    given = auth.get("application_token", "")
    portal = Portal.objects.filter(member_id=member_id).first()
    known = portal is not None and portal.state != Portal.State.UNINSTALLED
    matches = known and portal is not None and tokens_equal(given, portal.application_token)
    if name in ACKNOWLEDGED:
        return VerifiedEvent(name, member_id, auth, payload, portal if matches else None, None)
    if name == "ONAPPUNINSTALL":
        if not known:
            raise Refused(403, "Refused: unknown portal.")
        if not matches:
            raise Refused(403, "Refused: the application token does not match.")
        return VerifiedEvent(name, member_id, auth, payload, portal, None)
    # ONAPPINSTALL / ONAPPUPDATE: any tokens they bring are stored, so they must be vouched for.
    if name == "ONAPPUPDATE" and not known:
        raise Refused(403, "Refused: update for a portal that has not installed the app.")
    info = None
    if auth.get("access_token"):
        info = vouch_for_token(auth.get("server_endpoint", ""), auth["access_token"], member_id)
    elif name == "ONAPPINSTALL" or not matches:
        raise Refused(403, "Refused: Bitrix24 sends this event with an access token.")
    if not given:
        raise Refused(400, "The event has no auth[application_token].")
    replaces = not matches and bool(portal is not None and portal.application_token and known)
    admin = None
    if name == "ONAPPINSTALL" or replaces:
        # Installing (who the installer is) and a new application_token are an admin's to set.
        assert info is not None
        require_admin(info, auth.get("server_endpoint", ""), auth["access_token"])
        admin = True
    return VerifiedEvent(name, member_id, auth, payload, portal, info, not matches, admin)
