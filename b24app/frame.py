"""Verification of every request that claims to come from a portal. Nothing here writes
(beyond the REST call log of the one `user.admin` question).

Who may do what, and how it is checked:

- Install and app POSTs: `SERVER_ENDPOINT` must be allow-listed; the OAuth server's `app.info`
  vouches for `AUTH_ID` (our client_id, the member_id); the portal's domain, REST endpoint and the
  user come from that trusted answer, never from the POST. An app POST's `APPLICATION_TOKEN` must
  match the stored one (constant time). An install POST must come from a portal admin: the
  portal itself answers `user.admin` for the vouched token.
- Events: `auth[member_id]` must be a known portal and `auth[application_token]` must match —
  but every user who opened the app has that token, so it proves "about this portal", not "sent
  by Bitrix24". An event that installs, or replaces the stored application_token, also needs an
  access token the OAuth server vouches for and the portal calls an admin's. An uninstall is
  confirmed with the portal by the caller (see lifecycle.uninstall_verdict).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Model
from django.http import HttpRequest, QueryDict

from b24app import portal_client
from b24app.bitrix import oauth
from b24app.bitrix.errors import BitrixError, TransientError
from b24app.models import Portal, PortalUser
from b24app.redisconn import redis_client

log = logging.getLogger(__name__)

LANGS = {"en", "ru"}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._\-]{8,512}$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SECONDS_RE = re.compile(r"^[0-9]{1,10}$")  # ASCII digits only: "²".isdigit() is True


class Refused(Exception):
    """A request we will not act on: 400 when malformed, 403 when not trusted, 502/503 when the
    OAuth server could not be asked. The message is plain words and holds no secret."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_seconds(text: str) -> int | None:
    """A count of seconds in ASCII digits, or None (int() would take "²" and then fail)."""
    return int(text) if _SECONDS_RE.match(text) else None


def tokens_equal(given: str, stored: str) -> bool:
    return bool(given) and bool(stored) and hmac.compare_digest(given.encode(), stored.encode())


@dataclass(frozen=True)
class VerifiedFrame:
    info: oauth.AppInfo
    server_endpoint: str
    # Kept out of repr(), so a logged or reported frame never shows them.
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    application_token: str = field(repr=False)
    scope: str
    lang: str
    placement: str
    placement_options: dict[str, Any] = field(default_factory=dict)
    portal: Portal | None = None  # the stored portal, when there is one
    user: PortalUser | None = None  # the stored row of the frame's user (tokens deferred)
    also: Any = None  # the value of verify_frame_post's `also` (None for a user never seen)

    @property
    def user_id(self) -> int:
        assert self.info.user_id is not None
        return self.info.user_id


def _field(data: QueryDict, name: str, *, required: bool = True, limit: int = 2000) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        value = ""
    value = value.strip()
    if required and not value:
        raise Refused(400, f"The request is missing {name}: open the app from Bitrix24.")
    if len(value) > limit:
        raise Refused(400, f"{name} is too long.")
    if "\x00" in value:  # Bitrix24 never sends one, and PostgreSQL text cannot hold it
        raise Refused(400, f"{name} is malformed.")
    return value


class _Vouched:
    """What the OAuth server's app.info said of a token, trusted until B24_VERIFY_CACHE_SECONDS
    after it said it: kept in Redis for every process (as JSON), and in this process's memory in
    front of it, never past the same moment. A reopen within that time then costs no round
    trip; `fresh` asks Bitrix24 again and replaces both."""

    SIZE = 4096

    def __init__(self) -> None:
        self.clock = time.time
        self._lock = threading.Lock()
        self._local: OrderedDict[str, tuple[float, oauth.AppInfo]] = OrderedDict()

    def get(self, key: str) -> oauth.AppInfo | None:
        now = self.clock()
        with self._lock:
            found = self._local.get(key)
        if found is not None and found[0] > now:
            return found[1]
        raw = redis_client().get(key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            until, info = float(data["until"]), oauth.AppInfo(**data["info"])
        except (ValueError, TypeError, KeyError):  # not ours, or an older form: ask again
            return None
        if until <= now:
            return None
        self._remember(key, until, info)
        return info

    def put(self, key: str, info: oauth.AppInfo) -> None:
        seconds = settings.B24_VERIFY_CACHE_SECONDS
        if seconds <= 0:  # verifications are not to be trusted at all beyond the request
            return
        until = self.clock() + seconds
        redis_client().set(key, json.dumps({"until": until, "info": asdict(info)}), ex=seconds)
        self._remember(key, until, info)

    def _remember(self, key: str, until: float, info: oauth.AppInfo) -> None:
        with self._lock:
            self._local[key] = (until, info)
            self._local.move_to_end(key)
            while len(self._local) > self.SIZE:
                self._local.popitem(last=False)


VOUCHED = _Vouched()


def vouch_for_token(
    server_endpoint: str, access_token: str, member_id: str, *, fresh: bool = False
) -> oauth.AppInfo:
    """Ask the allow-listed OAuth server who this token belongs to (cached briefly, unless
    `fresh`: then Bitrix24 is asked again and the cache updated)."""
    try:
        oauth.trusted_server_base(server_endpoint)
    except oauth.UntrustedServer as exc:
        raise Refused(403, f"Refused: {exc.description}.") from None
    key = "fp:verify:" + hashlib.sha256(f"{server_endpoint}|{access_token}".encode()).hexdigest()
    cached = None if fresh else VOUCHED.get(key)
    if cached is not None:
        info = cached
    else:
        try:
            info = oauth.app_info(server_endpoint, access_token, timeout=settings.B24_WEB_TIMEOUT)
        except TransientError:
            raise Refused(
                503, "Bitrix24's authorization server did not answer; try again in a minute."
            ) from None
        except BitrixError as exc:
            raise Refused(
                403, f"Refused: Bitrix24 did not confirm this request ({exc.code})."
            ) from None
    if not hmac.compare_digest(info.client_id.encode(), settings.B24_CLIENT_ID.encode()):
        raise Refused(403, "Refused: this token was issued to another application.")
    if not info.member_id or not hmac.compare_digest(info.member_id.encode(), member_id.encode()):
        raise Refused(403, "Refused: the portal id does not match Bitrix24's answer.")
    if info.user_id is None:
        raise Refused(403, "Refused: Bitrix24 did not say which user this is.")
    try:
        oauth.check_portal_endpoint(info.client_endpoint)
    except oauth.UntrustedServer as exc:
        raise Refused(403, f"Refused: {exc.description}.") from None
    if cached is None:
        VOUCHED.put(key, info)
    return info


def require_admin(info: oauth.AppInfo, server_endpoint: str, access_token: str) -> None:
    """Refuse unless the portal says this token's owner is an administrator."""
    try:
        admin = portal_client.user_is_admin(info, server_endpoint, access_token)
    except TransientError:
        raise Refused(
            503, "Bitrix24 did not answer whether you are an administrator; try again shortly."
        ) from None
    except (BitrixError, oauth.UntrustedServer) as exc:
        raise Refused(
            403, f"Refused: Bitrix24 did not confirm you are an administrator ({exc.code})."
        ) from None
    if not admin:
        log.warning("portal %s: a non-admin tried to install or change the app", info.member_id)
        raise Refused(
            403,
            "Only an administrator of this Bitrix24 can install, reinstall or update Flow Pins. "
            "Nothing was changed.",
        )


class _Columns:
    """A model's columns in a hand-written SELECT, and its instances back from the rows, with
    the converters the ORM applies (decryption, SQLite's booleans and dates); the fields left
    out load on first use, as with `defer`."""

    def __init__(self, model: type[Model], alias: str, leave_out: tuple[str, ...] = ()) -> None:
        self.model = model
        self.alias = alias
        self.fields = [f for f in model._meta.concrete_fields if f.attname not in leave_out]
        self.names = [f.attname for f in self.fields]
        self._converters: dict[str, list[tuple[Any, list[Any]]]] = {}

    def select(self) -> str:
        qn = connection.ops.quote_name
        return ", ".join(f"{qn(self.alias)}.{qn(f.column)}" for f in self.fields)

    def converters(self) -> list[tuple[Any, list[Any]]]:
        found = self._converters.get(connection.vendor)
        if found is None:
            found = []
            for f in self.fields:
                col = f.get_col(self.alias)
                found.append(
                    (col, connection.ops.get_db_converters(col) + col.get_db_converters(connection))
                )
            self._converters[connection.vendor] = found
        return found

    def instance(self, values: Sequence[Any]) -> Any:
        converted = []
        for (col, converters), value in zip(self.converters(), values, strict=True):
            for convert in converters:
                value = convert(value, col, connection)
            converted.append(value)
        return self.model.from_db(connection.alias, self.names, converted)


_USER_COLUMNS = _Columns(PortalUser, "u", leave_out=("access_token", "refresh_token"))
_PORTAL_COLUMNS = _Columns(Portal, "p")


@dataclass(frozen=True)
class AlsoRead:
    """One more value a caller wants with the portal and the user, read in the same statement
    (a reopen then makes one round trip to the database): a scalar SQL expression over the
    aliases p (the portal) and u (the user), given the database vendor. Only our own names go
    into it; the value is what the database answers (None for a user never seen)."""

    name: str
    expression: Callable[[str], str]


@functools.cache
def _portal_and_user_sql(vendor: str, also: AlsoRead | None) -> str:
    """Built once: the ORM would build this text again on every reopen, at about the cost of
    running it."""
    qn = connection.ops.quote_name
    users, portals = qn(PortalUser._meta.db_table), qn(Portal._meta.db_table)
    extra = f", {also.expression(vendor)}" if also is not None else ""
    return (
        f"SELECT {_USER_COLUMNS.select()}, {_PORTAL_COLUMNS.select()}{extra} "  # noqa: S608
        f"FROM {users} u INNER JOIN {portals} p ON p.{qn('id')} = u.{qn('portal_id')} "
        f"WHERE p.{qn('member_id')} = %s AND u.{qn('user_id')} = %s"
    )


def stored_portal_and_user(
    member_id: str, user_id: int, also: AlsoRead | None = None
) -> tuple[Portal | None, PortalUser | None, Any]:
    """The stored portal and the row of its user (tokens not read), and `also`'s value, in one
    query for a user seen before (every reopen); a second one finds the portal of a user who
    has never opened the app."""
    with connection.cursor() as cursor:
        cursor.execute(_portal_and_user_sql(connection.vendor, also), [member_id, user_id])
        row = cursor.fetchone()
    if row is not None:
        split = len(_USER_COLUMNS.fields)
        end = split + len(_PORTAL_COLUMNS.fields)
        user: PortalUser = _USER_COLUMNS.instance(row[:split])
        portal: Portal = _PORTAL_COLUMNS.instance(row[split:end])
        PortalUser._meta.get_field("portal").set_cached_value(user, portal)
        return portal, user, row[end] if also is not None else None
    return Portal.objects.filter(member_id=member_id).first(), None, None


def verify_frame_post(
    request: HttpRequest, *, installing: bool, also: AlsoRead | None = None
) -> VerifiedFrame:
    """Check an install or app POST, as Bitrix24 sends it to the iframe. `also`: a value to
    read with the stored portal and user (VerifiedFrame.also)."""
    data = request.POST
    member_id = _field(data, "member_id", limit=64)
    access_token = _field(data, "AUTH_ID", limit=512)
    refresh_token = _field(data, "REFRESH_ID", required=False, limit=512)
    server_endpoint = _field(data, "SERVER_ENDPOINT", limit=500)
    application_token = _field(data, "APPLICATION_TOKEN", required=False, limit=200)
    expires_raw = _field(data, "AUTH_EXPIRES", required=False, limit=10) or "3600"
    placement = _field(data, "PLACEMENT", required=False, limit=100) or "DEFAULT"
    options_raw = _field(data, "PLACEMENT_OPTIONS", required=False, limit=10000)
    if not _MEMBER_RE.match(member_id):
        raise Refused(400, "member_id is malformed.")
    if not _TOKEN_RE.match(access_token) or (refresh_token and not _TOKEN_RE.match(refresh_token)):
        raise Refused(400, "The authorization fields are malformed.")
    expires_in = parse_seconds(expires_raw)
    if expires_in is None:
        raise Refused(400, "AUTH_EXPIRES must be a number of seconds.")
    options: dict[str, Any] = {}
    if options_raw:
        try:
            parsed = json.loads(options_raw)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            raise Refused(400, "PLACEMENT_OPTIONS is not valid JSON.") from None
        if parsed == []:  # PHP's json_encode of an empty array: no options
            parsed = {}
        if not isinstance(parsed, dict):
            raise Refused(400, "PLACEMENT_OPTIONS must be a JSON object.")
        options = parsed
    lang = (request.GET.get("LANG") or "").lower()[:5]
    lang = lang if lang in LANGS else "en"

    info = vouch_for_token(server_endpoint, access_token, member_id)
    opener = request.headers.get("Origin", "")
    if opener and opener != "null" and opener != oauth.origin_of(info.client_endpoint):
        # The frame's parent is not where the cached answer puts the portal: a rename, most
        # likely. Ask Bitrix24 again rather than trust the cache (or the header).
        info = vouch_for_token(server_endpoint, access_token, member_id, fresh=True)
    assert info.user_id is not None  # vouch_for_token refuses an answer without one
    portal, user, also_value = stored_portal_and_user(info.member_id, info.user_id, also)
    if installing:
        require_admin(info, server_endpoint, access_token)
    if portal is not None and portal.is_active and portal.application_token and not installing:
        if not tokens_equal(application_token, portal.application_token):
            raise Refused(
                403,
                "Refused: the application token does not match this portal's. "
                "If the app was reinstalled, ask the admin to open it once.",
            )
    if not installing and (portal is None or portal.state == Portal.State.UNINSTALLED):
        raise Refused(
            403,
            "This app is not installed on your portal yet: ask an administrator "
            "to install it from the Bitrix24 Market.",
        )
    return VerifiedFrame(
        portal=portal,
        user=user,
        info=info,
        server_endpoint=server_endpoint,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_in=expires_in,
        application_token=application_token,
        scope=_field(data, "APPLICATION_SCOPE", required=False, limit=500),
        lang=lang,
        placement=placement,
        placement_options=options,
        also=also_value,
    )


# --- events -----------------------------------------------------------------------------------

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
    if not member_id or not _MEMBER_RE.match(member_id):
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
