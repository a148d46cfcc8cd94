"""Verification of the install and app POSTs Bitrix24 sends to the iframe, and what every
check of a portal's request shares: the OAuth server's word on a token, the admin question.
Nothing here writes (beyond the REST call log of the one `user.admin` question).

`SERVER_ENDPOINT` must be allow-listed; the OAuth server's `app.info` vouches for `AUTH_ID` (our
client_id, the member_id); the portal's domain, REST endpoint and the user come from that
trusted answer, never from the POST. An app POST's `APPLICATION_TOKEN` must match the stored one
(constant time). An install POST must come from a portal admin: the portal itself answers
`user.admin` for the vouched token. Events are checked in eventauth.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.http import HttpRequest, QueryDict

from b24app import langs, logcontext, portal_client
from b24app.bitrix import oauth
from b24app.bitrix.errors import BitrixError, TransientError
from b24app.models import Portal, PortalUser
from b24app.problems import Refused
from b24app.redisconn import redis_client
from b24app.stored import AlsoRead, stored_portal_and_user

log = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"^[A-Za-z0-9._\-]{8,512}$")
MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SECONDS_RE = re.compile(r"^[0-9]{1,10}$")  # ASCII digits only: "²".isdigit() is True


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
    lang: str  # the Django language the app speaks to this user (b24app.langs)
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


def _placement_options(raw: str) -> dict[str, Any]:
    """PLACEMENT_OPTIONS: a JSON object, or nothing."""
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise Refused(400, "PLACEMENT_OPTIONS is not valid JSON.") from None
    if parsed == []:  # PHP's json_encode of an empty array: no options
        parsed = {}
    if not isinstance(parsed, dict):
        raise Refused(400, "PLACEMENT_OPTIONS must be a JSON object.")
    return parsed


def _vouch_for_frame(
    request: HttpRequest, server_endpoint: str, access_token: str, member_id: str
) -> oauth.AppInfo:
    """The OAuth server's word on the frame's token, asked again when the frame's parent is not
    where a cached answer puts the portal."""
    info = vouch_for_token(server_endpoint, access_token, member_id)
    opener = request.headers.get("Origin", "")
    if opener and opener != "null" and opener != oauth.origin_of(info.client_endpoint):
        # The frame's parent is not where the cached answer puts the portal: a rename, most
        # likely. Ask Bitrix24 again rather than trust the cache (or the header).
        info = vouch_for_token(server_endpoint, access_token, member_id, fresh=True)
    return info


def _refuse_unless_installed(portal: Portal | None, application_token: str) -> None:
    """An app POST needs the app installed on its portal, and that portal's application token."""
    if portal is not None and portal.is_active and portal.application_token:
        if not tokens_equal(application_token, portal.application_token):
            raise Refused(
                403,
                "Refused: the application token does not match this portal's. "
                "If the app was reinstalled, ask the admin to open it once.",
            )
    if portal is None or portal.state == Portal.State.UNINSTALLED:
        raise Refused(
            403,
            "This app is not installed on your portal yet: ask an administrator "
            "to install it from the Bitrix24 Market.",
        )


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
    if not MEMBER_RE.match(member_id):
        raise Refused(400, "member_id is malformed.")
    if not _TOKEN_RE.match(access_token) or (refresh_token and not _TOKEN_RE.match(refresh_token)):
        raise Refused(400, "The authorization fields are malformed.")
    expires_in = parse_seconds(expires_raw)
    if expires_in is None:
        raise Refused(400, "AUTH_EXPIRES must be a number of seconds.")
    options = _placement_options(options_raw)
    lang = langs.speak(request.GET.get("LANG"))  # Bitrix24's code → a language we ship

    info = _vouch_for_frame(request, server_endpoint, access_token, member_id)
    assert info.user_id is not None  # vouch_for_token refuses an answer without one
    portal, user, also_value = stored_portal_and_user(info.member_id, info.user_id, also)
    if installing:
        require_admin(info, server_endpoint, access_token)
    else:
        _refuse_unless_installed(portal, application_token)
    logcontext.bind(member_id=info.member_id, user_id=info.user_id)  # verified: log lines say who
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
