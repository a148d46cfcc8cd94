"""The Bitrix24-facing entry points: installer, app page and event handler.

Views parse and verify (frame, eventauth), call a service (lifecycle, tokens), and answer.
Bitrix24's POSTs carry no CSRF token, so these three views (and only these) are CSRF-exempt;
they are authenticated by the OAuth server and the application_token instead.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, cast

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import translation
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods
from redis.exceptions import RedisError

from b24app import (
    eventauth,
    frame,
    lifecycle,
    logcontext,
    placements,
    portal_client,
    tasks,
    tokens,
)
from b24app.bitrix import oauth
from b24app.bitrix.errors import (
    BitrixError,
    ReinstallRequired,
    ReopenRequired,
    TransientError,
)
from b24app.models import Portal, PortalUser
from b24app.placements import FrameRequest
from b24app.problems import OVER_LIMITS, Problem, Refused, over_limits, words
from b24app.stored import AlsoRead

log = logging.getLogger(__name__)


def refusal(exc: Refused) -> HttpResponse:
    return HttpResponse(
        exc.message + "\n", status=exc.status, content_type="text/plain; charset=utf-8"
    )


def framed(request: HttpRequest, response: HttpResponse, portal_origin: str | None) -> HttpResponse:
    """Let the verified portal (and only it) frame this page; scripts only with our nonce.

    default-src does not cover base-uri or form-action: an injected <base> would move the page's
    relative script and API addresses, an injected <form> would post wherever it likes. Plugins
    (object-src) have no use here at all, not even from our own origin."""
    ancestors = f"'self' {portal_origin}" if portal_origin else "'self'"
    nonce = getattr(request, "csp_nonce", "")
    response["Content-Security-Policy"] = (
        f"frame-ancestors {ancestors}; default-src 'self'; "
        f"script-src 'self' 'nonce-{nonce}' https://api.bitrix24.com; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; object-src 'none'"
    )
    response["Referrer-Policy"] = "no-referrer"
    return response


def _describe(request: HttpRequest, what: str) -> HttpResponse:
    """GET/HEAD on a handler URL (the vendor console checks them with HEAD)."""
    return HttpResponse(
        f"Flow Pins {what}. Bitrix24 opens this address with a POST.\n",
        content_type="text/plain; charset=utf-8",
    )


def entry(
    what: str,
) -> Callable[[Callable[[HttpRequest], HttpResponse]], Callable[[HttpRequest], HttpResponse]]:
    def wrap(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
        @csrf_exempt
        @xframe_options_exempt
        @require_http_methods(["GET", "HEAD", "POST"])
        # Every field of these POSTs comes from Bitrix24 and several are bearer secrets
        # (AUTH_ID, REFRESH_ID, APPLICATION_TOKEN, auth[access_token], ...): an error report
        # (the admins' e-mail, a 500 page) shows none of their values.
        @sensitive_post_parameters()
        def wrapped(request: HttpRequest) -> HttpResponse:
            request.csp_nonce = secrets.token_urlsafe(16)  # type: ignore[attr-defined]
            if request.method != "POST":
                return _describe(request, what)
            try:
                return view(request)
            except (Refused, *OVER_LIMITS) as exc:
                refused = exc if isinstance(exc, Refused) else over_limits(exc)
                log.info("refused %s request: %s", what, refused.message)
                return refusal(refused)
            except RedisError:  # the cache, the shared rate limit and the queue live in Redis
                log.warning("%s request: Redis is not answering", what)
                return refusal(Refused(503, words(Problem.APP_UNAVAILABLE)))

        wrapped.__name__ = view.__name__
        return wrapped

    return wrap


def _store_frame_tokens(
    portal: Portal, verified: frame.VerifiedFrame, is_admin: bool | None = None
) -> PortalUser:
    """Keep the tokens the frame brought, for the user who opened it."""
    return tokens.user_tokens_store(
        portal,
        verified.user_id,
        access_token=verified.access_token,
        refresh_token=verified.refresh_token,
        expires_in=verified.expires_in,
        language=verified.lang,
        is_admin=is_admin,
        stored=verified.user,
    )


@entry("installer")
def install(request: HttpRequest) -> HttpResponse:
    if "event" in request.POST and "AUTH_ID" not in request.POST:
        # Bitrix24 posts some events server-to-server to the installer URL (ONAPPUSERREADY for
        # every app; ONAPPINSTALL for API-only ones): the event handler's rules apply.
        return events(request)
    verified = frame.verify_frame_post(request, installing=True)
    translation.activate(verified.lang)
    portal = lifecycle.portal_install(
        info=verified.info,
        server_endpoint=verified.server_endpoint,
        application_token=verified.application_token,
        scope=verified.scope,
    )
    _store_frame_tokens(portal, verified, is_admin=True)  # the installer is an administrator
    context: dict[str, Any] = {
        "portal": portal,
        "ok": False,
        "problem": "",
        "bx24_js": settings.B24_JS_SDK_URL,
    }
    try:
        lifecycle.portal_bind_handlers(portal)
        context["ok"] = True
    except TransientError as exc:
        context["problem"] = "busy"
        context["detail"] = exc.code
    except BitrixError as exc:
        context["problem"] = "failed"
        # Why, for the admin: our own reason for a reopen/reinstall, else Bitrix24's error code.
        ours = isinstance(exc, ReopenRequired | ReinstallRequired)
        context["detail"] = exc.description if ours else exc.code
    response = render(request, "b24app/install.html", context, status=200 if context["ok"] else 502)
    return framed(request, response, portal.origin)


def frame_entry(
    what: str, *, also: Callable[[HttpRequest], AlsoRead | None] = lambda request: None
) -> Callable[[Callable[[FrameRequest], HttpResponse]], Callable[[HttpRequest], HttpResponse]]:
    """The one entry for pages Bitrix24 opens in its frame.

    It verifies the POST (a 4xx with words otherwise, nothing stored), follows a renamed
    portal, keeps the frame's tokens for its user, speaks their language and puts the portal,
    the user and the verified frame on the request; the answer may be framed by that portal
    only. `also`: one more value to read with the portal and the user (`stored.AlsoRead`).
    """

    def wrap(
        view: Callable[[FrameRequest], HttpResponse],
    ) -> Callable[[HttpRequest], HttpResponse]:
        @entry(what)
        def wrapped(request: HttpRequest) -> HttpResponse:
            verified = frame.verify_frame_post(request, installing=False, also=also(request))
            portal = verified.portal  # verify_frame_post refuses an app POST without one
            assert portal is not None
            portal = portal_client.portal_follow_endpoint(portal, verified.info)  # renames
            user = _store_frame_tokens(portal, verified)
            translation.activate(verified.lang)
            opened = cast(FrameRequest, request)
            opened.portal, opened.b24user, opened.frame = portal, user, verified
            return framed(request, view(opened), portal.origin)

        wrapped.__name__ = view.__name__
        return wrapped

    return wrap


def _placement(request: HttpRequest) -> placements.Placement:
    return placements.find(request.POST.get("PLACEMENT", "") or placements.DEFAULT)


@frame_entry("application page", also=lambda request: _placement(request).also)
def app(request: FrameRequest) -> HttpResponse:
    """Every placement of the app opens this one URL: the one Bitrix24 names renders."""
    return _placement(request).view(request)


@entry("event handler")
def events(request: HttpRequest) -> HttpResponse:
    event = eventauth.verify_event(request)
    if event.portal is not None or event.info is not None:  # vouched for: log lines say whose
        logcontext.bind(member_id=event.member_id)
    auth, info = event.auth, event.info
    if event.name in eventauth.ACKNOWLEDGED:
        log.info(
            "event %s for portal %s: acknowledged, nothing to do (application token %s)",
            event.name,
            event.member_id,
            "matches" if event.portal is not None else "does not match",
        )
    elif event.name == "ONAPPINSTALL":
        assert info is not None  # verify_event refuses an install without a vouched admin token
        portal = lifecycle.portal_install(
            info=info,
            server_endpoint=auth.get("server_endpoint", ""),
            application_token=auth.get("application_token", ""),
            scope=auth.get("scope", ""),
        )
        _store_event_tokens(portal, info, auth, is_admin=event.admin)
        tasks.request_rebind(portal.pk)
    elif event.name == "ONAPPUPDATE":
        assert event.portal is not None
        portal = lifecycle.portal_update(
            event.portal,
            application_token=auth["application_token"] if event.new_application_token else "",
        )
        if info is not None:
            _store_event_tokens(portal, info, auth, is_admin=event.admin)
        tasks.request_rebind(portal.pk)  # an update drops bindings
    else:
        assert event.portal is not None
        return _uninstall(event.portal, clean=event.data.get("CLEAN") in {"1", "Y"})
    return HttpResponse("ok\n", content_type="text/plain")


def _uninstall(portal: Portal, *, clean: bool) -> HttpResponse:
    """ONAPPUNINSTALL carries no token, only the application_token every user has seen: delete
    only when Bitrix24 confirms it by refusing the app's own tokens."""
    verdict = lifecycle.uninstall_verdict(portal)
    if verdict is lifecycle.UninstallVerdict.CONFIRMED:
        lifecycle.portal_uninstall(portal, clean=clean)
        return HttpResponse("ok\n", content_type="text/plain")
    if verdict is lifecycle.UninstallVerdict.UNKNOWN:
        tasks.confirm_uninstall.delay_on_commit(portal_id=portal.pk, clean=clean)
        return HttpResponse(
            "Accepted: Bitrix24 could not be asked just now; the uninstall is confirmed with it "
            "in the background.\n",
            status=202,
            content_type="text/plain; charset=utf-8",
        )
    log.warning(
        "portal %s: ONAPPUNINSTALL refused, the app's tokens still work (not Bitrix24's word)",
        portal.member_id,
    )
    raise Refused(
        403,
        "Refused: uninstall not confirmed by Bitrix24 (the app's tokens for this portal still "
        "work). Nothing was deleted.",
    )


def _store_event_tokens(
    portal: Portal, info: oauth.AppInfo, auth: dict[str, str], *, is_admin: bool | None
) -> None:
    """Keep the tokens an event brought — for the user the OAuth server says owns them."""
    if info.user_id is None or not auth.get("access_token"):
        return
    tokens.user_tokens_store(
        portal,
        info.user_id,
        access_token=auth["access_token"],
        refresh_token=auth.get("refresh_token", ""),
        expires_in=frame.parse_seconds(auth.get("expires_in", "")) or 3600,
        is_admin=is_admin,
    )
