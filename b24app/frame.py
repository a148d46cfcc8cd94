"""Verification of every request that claims to come from a portal. Nothing here writes.

- Install and app POSTs: `SERVER_ENDPOINT` must be allow-listed; the OAuth server's `app.info`
  vouches for `AUTH_ID` (our client_id, the member_id); the portal's domain, REST endpoint and the
  user come from that trusted answer, never from the POST. Once a portal holds an
  application_token, `APPLICATION_TOKEN` must match it (constant time).
- Events: `auth[member_id]` must be a known portal and `auth[application_token]` must match; an
  event that carries an access token (ONAPPINSTALL, ONAPPUPDATE) may instead be vouched for by the
  OAuth server — that is how a new application_token arrives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, QueryDict

from b24app.bitrix import oauth
from b24app.bitrix.errors import BitrixError, TransientError
from b24app.models import Portal

log = logging.getLogger(__name__)

LANGS = {"en", "ru"}
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._\-]{8,512}$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class Refused(Exception):
    """A request we will not act on: 400 when malformed, 403 when not trusted, 502/503 when the
    OAuth server could not be asked. The message is plain words and holds no secret."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def tokens_equal(given: str, stored: str) -> bool:
    return bool(given) and bool(stored) and hmac.compare_digest(given.encode(), stored.encode())


@dataclass(frozen=True)
class VerifiedFrame:
    info: oauth.AppInfo
    server_endpoint: str
    access_token: str
    refresh_token: str
    expires_in: int
    application_token: str
    scope: str
    lang: str
    placement: str
    placement_options: dict[str, Any] = field(default_factory=dict)
    portal: Portal | None = None  # the stored portal, when there is one

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
    return value


def vouch_for_token(server_endpoint: str, access_token: str, member_id: str) -> oauth.AppInfo:
    """Ask the allow-listed OAuth server who this token belongs to (cached briefly)."""
    try:
        oauth.trusted_server_base(server_endpoint)
    except oauth.UntrustedServer as exc:
        raise Refused(403, f"Refused: {exc.description}.") from None
    key = "fp:verify:" + hashlib.sha256(f"{server_endpoint}|{access_token}".encode()).hexdigest()
    cached = cache.get(key)
    if isinstance(cached, oauth.AppInfo):
        info = cached
    else:
        try:
            info = oauth.app_info(server_endpoint, access_token)
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
    if not isinstance(cached, oauth.AppInfo):
        cache.set(key, info, settings.B24_VERIFY_CACHE_SECONDS)
    return info


def verify_frame_post(request: HttpRequest, *, installing: bool) -> VerifiedFrame:
    """Check an install or app POST, as Bitrix24 sends it to the iframe."""
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
    if not expires_raw.isdigit():
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
    portal = Portal.objects.filter(member_id=info.member_id).first()
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
        info=info,
        server_endpoint=server_endpoint,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_in=int(expires_raw),
        application_token=application_token,
        scope=_field(data, "APPLICATION_SCOPE", required=False, limit=500),
        lang=lang,
        placement=placement,
        placement_options=options,
    )


# --- events -----------------------------------------------------------------------------------

EVENTS = {"ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL"}


@dataclass(frozen=True)
class VerifiedEvent:
    name: str
    member_id: str
    auth: dict[str, str]
    data: dict[str, str]
    portal: Portal | None  # None only for the first ONAPPINSTALL of a portal
    info: oauth.AppInfo | None  # set when the OAuth server vouched for the event's token


def _brackets(data: QueryDict, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in data:
        if key.startswith(prefix + "[") and key.endswith("]"):
            out[key[len(prefix) + 1 : -1]] = str(data.get(key, ""))[:2000]
    return out


def verify_event(request: HttpRequest) -> VerifiedEvent:
    content_type = request.content_type or ""
    if content_type != "application/x-www-form-urlencoded":
        raise Refused(400, "Events must be form-encoded, as Bitrix24 sends them.")
    data = request.POST
    name = str(data.get("event", "")).upper()
    if not name:
        raise Refused(400, "The request has no event name.")
    if name not in EVENTS:
        raise Refused(400, f"This app does not handle the event {name[:40]}.")
    auth = _brackets(data, "auth")
    member_id = auth.get("member_id", "")
    if not member_id or not _MEMBER_RE.match(member_id):
        raise Refused(400, "The event has no valid auth[member_id].")
    given = auth.get("application_token", "")
    portal = Portal.objects.filter(member_id=member_id).first()
    known = portal is not None and portal.state != Portal.State.UNINSTALLED
    if known and portal is not None and tokens_equal(given, portal.application_token):
        return VerifiedEvent(name, member_id, auth, _brackets(data, "data"), portal, None)
    # No stored token matches. Only an event carrying an access token can be vouched for by the
    # OAuth server: the first install, a reinstall, or an update with a new application_token.
    if name in {"ONAPPINSTALL", "ONAPPUPDATE"} and auth.get("access_token") and given:
        info = vouch_for_token(auth.get("server_endpoint", ""), auth["access_token"], member_id)
        if name == "ONAPPUPDATE" and not known:
            raise Refused(403, "Refused: update for a portal that has not installed the app.")
        return VerifiedEvent(name, member_id, auth, _brackets(data, "data"), portal, info)
    if not known:
        raise Refused(403, "Refused: unknown portal.")
    raise Refused(403, "Refused: the application token does not match.")
