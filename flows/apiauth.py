"""The JSON endpoints' common frame: the signed page token, the per-user request limit, and
refusals in words. The page gets its token when Bitrix24 opens the app; every call it makes
carries the token in a header (no cookie, so no CSRF)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import signing
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import translation
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from b24app import langs, logcontext
from b24app.bitrix.ratelimit import take
from b24app.models import Portal, PortalUser
from b24app.problems import OVER_LIMITS, Problem, Refused, over_limits, words

log = logging.getLogger(__name__)

TOKEN_SALT = "flowpins.page"
TOKEN_HEADER = "HTTP_X_FLOWPINS_TOKEN"
MAX_FLOWS_PER_REQUEST = 500


def page_token(portal: Portal, user: PortalUser, lang: str) -> str:
    # "m": the portal's member_id, for the log lines of the page's requests (no query needed).
    return signing.dumps(
        {"p": portal.pk, "u": user.user_id, "l": lang, "m": portal.member_id}, salt=TOKEN_SALT
    )


@dataclass(frozen=True)
class PageClaims:
    """Who the signed page token speaks for, checked by its signature alone (no query)."""

    portal_id: int
    user_id: int


def page_claims(request: HttpRequest) -> PageClaims:
    raw = request.META.get(TOKEN_HEADER, "")
    if not raw:
        raise Refused(401, _("Please reopen the app from Bitrix24."))
    try:
        data = signing.loads(raw, salt=TOKEN_SALT, max_age=settings.FLOWPINS_PAGE_TOKEN_SECONDS)
    except signing.SignatureExpired:
        raise Refused(401, _("This page has expired: please reopen the app.")) from None
    except signing.BadSignature:
        raise Refused(403, _("This request was not issued by the app.")) from None
    # The language the page was rendered in; one no longer shipped falls back (b24app.langs).
    translation.activate(langs.shipped(data.get("l")))
    portal_id, user_id = data.get("p"), data.get("u")
    if not isinstance(portal_id, int) or not isinstance(user_id, int):
        raise Refused(403, _("This request was not issued by the app."))
    logcontext.bind(member_id=data.get("m"), user_id=user_id)
    return PageClaims(portal_id, user_id)


def page_auth(request: HttpRequest) -> tuple[Portal, PortalUser]:
    claims = page_claims(request)
    # One query, and no token decrypted: the endpoints behind this need neither.
    user = (
        PortalUser.objects.select_related("portal")
        .defer("access_token", "refresh_token", "portal__application_token")
        .filter(portal_id=claims.portal_id, user_id=claims.user_id)
        .first()
    )
    if user is None or not user.portal.is_active:
        raise Refused(403, _("The app is not installed on this portal any more."))
    return user.portal, user


# Per user and endpoint: requests a second and burst. Generous for a person (a click, a status
# poll every second, a Pin all in chunks of 500), tight for a script spending the portal's
# shared REST budget or the workers' time on everyone else's behalf.
API_LIMITS: dict[str, tuple[float, int]] = {
    "pin": (5.0, 30),
    "status": (10.0, 30),
    "rows": (5.0, 20),
    "add_flow": (0.5, 5),
    # A read costs the portal one request per 25 flows (40 for 1,000): one a minute, after two.
    "check_pins": (1 / 60, 2),
    # The admin's section: polled every second while a re-binding or a read runs.
    "admin_status": (2.0, 40),
    "admin_rebind": (0.1, 3),
}


def _too_many(wait: float) -> HttpResponse:
    seconds = max(1, math.ceil(wait))
    response = JsonResponse(
        {
            "error": _("Too many requests from you; try again in %(seconds)d seconds.")
            % {"seconds": seconds}
        },
        status=429,
    )
    response["Retry-After"] = str(seconds)
    return response


def _over_limit(key: str, rate: float, burst: int) -> float:
    """Seconds this user must wait, or 0. Fails open: with Redis down a click is still saved
    (and applied once the queue is back) rather than refused by its own guard."""
    try:
        return take(key, rate, burst)
    except RedisError:
        return 0.0


def api(view: Any, *, lookup: bool = True) -> Any:
    """The JSON endpoints' common frame: the page token, the per-user limit, and errors in
    words. `lookup=False`: the view gets the token's claims and checks the portal itself."""
    rate, burst = API_LIMITS[view.__name__]

    @csrf_exempt  # authenticated by the signed page token in a header, not by a cookie
    def wrapped(request: HttpRequest) -> HttpResponse:
        try:
            who: list[Any]
            if lookup:
                portal, user = page_auth(request)
                key, who = f"{portal.pk}:{user.user_id}", [portal, user]
            else:
                claims = page_claims(request)
                key, who = f"{claims.portal_id}:{claims.user_id}", [claims]
            if wait := _over_limit(f"api:{view.__name__}:{key}", rate, burst):
                return _too_many(wait)
            response: HttpResponse = view(request, *who)
            return response
        except Refused as exc:
            return JsonResponse({"error": exc.message}, status=exc.status)
        except OVER_LIMITS as exc:  # a body past the cap, a query with too many fields
            refused = over_limits(exc, sender="the app's page")
            return JsonResponse({"error": refused.message}, status=refused.status)
        except RedisError:  # the shared rate limit and the queue live in Redis
            log.warning("%s: Redis is not answering", view.__name__)
            return JsonResponse({"error": words(Problem.APP_UNAVAILABLE)}, status=503)

    wrapped.__name__ = view.__name__
    return wrapped


def api_claims(view: Any) -> Any:
    return api(view, lookup=False)


def json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise Refused(400, _("The request body is not valid JSON.")) from None
    if not isinstance(body, dict):
        raise Refused(400, _("The request body must be a JSON object."))
    return body
