"""The page users see inside Bitrix24, and its small JSON endpoints.

The page is rendered by the verified app POST (b24app.views.app). It carries a short-lived signed
token bound to that portal and user, sent back in a header by the page's own requests — no
third-party cookie is needed inside the iframe.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from django.conf import settings
from django.core import signing
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import translation
from django.utils.translation import gettext as _
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from redis.exceptions import RedisError

from b24app import services as portal_services
from b24app.bitrix.errors import AccessDenied, BitrixError, TransientError
from b24app.models import Portal, PortalUser
from flows import services, tasks
from flows.models import PinIntent

log = logging.getLogger(__name__)

TOKEN_SALT = "flowpins.page"
TOKEN_HEADER = "HTTP_X_FLOWPINS_TOKEN"
MAX_FLOWS_PER_REQUEST = 500


# --- the page token ---------------------------------------------------------------------------


def page_token(portal: Portal, user: PortalUser, lang: str) -> str:
    return signing.dumps({"p": portal.pk, "u": user.user_id, "l": lang}, salt=TOKEN_SALT)


class PageAuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def page_auth(request: HttpRequest) -> tuple[Portal, PortalUser]:
    raw = request.META.get(TOKEN_HEADER, "")
    if not raw:
        raise PageAuthError(401, _("Please reopen the app from Bitrix24."))
    try:
        data = signing.loads(raw, salt=TOKEN_SALT, max_age=settings.FLOWPINS_PAGE_TOKEN_SECONDS)
    except signing.SignatureExpired:
        raise PageAuthError(401, _("This page has expired: please reopen the app.")) from None
    except signing.BadSignature:
        raise PageAuthError(403, _("This request was not issued by the app.")) from None
    translation.activate(data.get("l") or "en")
    # One query, and no token decrypted: the endpoints behind this need neither.
    user = (
        PortalUser.objects.select_related("portal")
        .defer("access_token", "refresh_token", "portal__application_token")
        .filter(portal_id=data.get("p"), user_id=data.get("u"))
        .first()
    )
    if user is None or not user.portal.is_active:
        raise PageAuthError(403, _("The app is not installed on this portal any more."))
    return user.portal, user


def _api(view: Any) -> Any:
    @csrf_exempt  # authenticated by the signed page token in a header, not by a cookie
    def wrapped(request: HttpRequest) -> HttpResponse:
        try:
            portal, user = page_auth(request)
            response: HttpResponse = view(request, portal, user)
            return response
        except PageAuthError as exc:
            return JsonResponse({"error": exc.message}, status=exc.status)
        except RedisError:  # the shared rate limit and the queue live in Redis
            log.warning("%s: Redis is not answering", view.__name__)
            return JsonResponse(
                {"error": _("The app is briefly unavailable; try again in a minute.")}, status=503
            )

    wrapped.__name__ = view.__name__
    return wrapped


# --- presenting intents -----------------------------------------------------------------------


def problem_text(problem: str) -> str:
    texts: dict[str, str] = {
        PinIntent.Problem.DENIED: _("You can no longer see this flow."),
        PinIntent.Problem.RATE_LIMITED: _("Waiting for Bitrix24 (rate limit)…"),
        PinIntent.Problem.UNAVAILABLE: _("Bitrix24 is not answering; retrying…"),
        PinIntent.Problem.REOPEN: _("Please reopen the app: your Bitrix24 session has ended."),
        PinIntent.Problem.REINSTALL: _("The app must be reinstalled by an administrator."),
        PinIntent.Problem.GAVE_UP: _("Could not confirm the state with Bitrix24; try again."),
    }
    return texts.get(problem, "")


def intent_json(intent: PinIntent) -> dict[str, Any]:
    if intent.status == PinIntent.Status.PENDING:
        text = _("Pinning…") if intent.desired else _("Unpinning…")
        if intent.problem:
            text = problem_text(intent.problem)
    elif intent.status == PinIntent.Status.DONE:
        text = _("Pinned.") if intent.observed else _("Unpinned.")
    else:
        text = problem_text(intent.problem)
    return {
        "flow_id": intent.flow_id,
        "desired": intent.desired,
        "observed": intent.observed,
        "status": intent.status,
        "problem": intent.problem,
        "message": text,
        "pinned": bool(intent.observed) if intent.observed is not None else None,
    }


def _rows(flows: list[dict[str, Any]], intents: dict[int, PinIntent]) -> list[dict[str, Any]]:
    rows = []
    for f in flows:
        intent = intents.get(int(f["id"]))
        pinned = bool(intent and intent.observed)
        rows.append({**f, "pinned": pinned, "intent": intent_json(intent) if intent else None})
    rows.sort(key=lambda r: (not r["pinned"], str(r["name"]).casefold(), r["id"]))
    return rows


# --- the page ---------------------------------------------------------------------------------


def json_for_script(value: Any) -> str:
    """JSON safe inside <script type="application/json">, like Django's json_script but without
    its per-character translate (a page of flows is tens of kilobytes)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003C").replace(">", "\\u003E")


def app_page(request: HttpRequest, *, portal: Portal, user: PortalUser) -> HttpResponse:
    """Render the user's flows: a recent snapshot at once (refreshed in the background), or one
    call per 50 flows when there is none."""
    problem = ""
    snap = services.snapshot_get(portal, user.user_id)
    if snap is None:
        try:
            snap = services.flows_fetch(portal, user)
        except portal_services.ReopenRequired:
            problem = "reopen"
        except portal_services.ReinstallRequired:
            problem = "reinstall"
        except TransientError:
            problem = "busy"
        except BitrixError as exc:
            log.warning("flow list failed for portal %s: %s", portal.member_id, exc.code)
            problem = "failed"
    elif snap.age > services.SNAPSHOT_FRESH:
        try:
            tasks.refresh_snapshot.delay(portal_id=portal.pk, user_id=user.user_id)
        except Exception:  # the broker is down: the snapshot is still worth showing
            log.warning("could not queue a snapshot refresh")
    flows = snap.flows if snap else []
    intents = {i.flow_id: i for i in PinIntent.objects.filter(portal=portal, user_id=user.user_id)}
    lang = translation.get_language() or "en"
    context = {
        "portal": portal,
        "user": user,
        "rows_json": json_for_script(_rows(flows, intents)),
        "problem": problem,
        "snapshot_age": int(snap.age) if snap else None,
        "page_token": page_token(portal, user, lang),
        "bx24_js": settings.B24_JS_SDK_URL,
        "messages_js": {
            "pin": _("Pin"),
            "unpin": _("Unpin"),
            "pinning": _("Pinning…"),
            "unpinning": _("Unpinning…"),
            "pinned": _("Pinned."),
            "unpinned": _("Unpinned."),
            "failed": _("Something went wrong; try again."),
            "offline": _("The app cannot reach its server; try again."),
            "no_match": _("No flow matches your search."),
            "added": _("Flow added."),
            "active": _("active"),
            "inactive": _("inactive"),
        },
    }
    return render(request, "flows/app.html", context)


# --- JSON endpoints ---------------------------------------------------------------------------


def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise PageAuthError(400, _("The request body is not valid JSON.")) from None
    if not isinstance(body, dict):
        raise PageAuthError(400, _("The request body must be a JSON object."))
    return body


@require_POST
@_api
def pin(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """Record the click and answer at once; a Celery task converges the portal to it."""
    body = _json_body(request)
    raw_ids = body.get("flow_ids", [body.get("flow_id")])
    desired = body.get("pinned")
    if not isinstance(desired, bool):
        return JsonResponse({"error": _("Say whether the flow should be pinned.")}, status=400)
    if not isinstance(raw_ids, list) or not raw_ids or len(raw_ids) > MAX_FLOWS_PER_REQUEST:
        return JsonResponse({"error": _("Name the flows to pin.")}, status=400)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**31 for i in raw_ids):
        return JsonResponse({"error": _("Flow ids are positive whole numbers.")}, status=400)
    intents = services.pin_intent_set(portal, user.user_id, list(dict.fromkeys(raw_ids)), desired)
    if any(i.status == PinIntent.Status.PENDING for i in intents):
        try:
            tasks.enqueue_converge(portal.pk, user.user_id)
        except Exception:
            log.warning("could not queue pin work for portal %s", portal.member_id)
            return JsonResponse(
                {
                    "error": _(
                        "The pin queue is not available right now. Your choice is saved and "
                        "will be applied when it is back."
                    ),
                    "intents": [intent_json(i) for i in intents],
                },
                status=503,
            )
    return JsonResponse({"intents": [intent_json(i) for i in intents]}, status=202)


@require_GET
@_api
def status(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    ids = [int(x) for x in request.GET.get("ids", "").split(",") if x.isdigit()][:1000]
    qs = PinIntent.objects.filter(portal=portal, user_id=user.user_id)
    if ids:
        qs = qs.filter(flow_id__in=ids)
    return JsonResponse({"intents": [intent_json(i) for i in qs]})


_FLOW_ID_IN_TEXT = re.compile(r"(\d{1,10})(?!.*\d)")


@require_POST
@_api
def add_flow(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """Add a flow by its id or a link to it (the last number in the text)."""
    text = str(_json_body(request).get("flow", ""))[:500]
    match = _FLOW_ID_IN_TEXT.search(text)
    if not match or int(match.group(1)) <= 0:
        return JsonResponse({"error": _("Paste a flow id or a link to the flow.")}, status=400)
    try:
        info = services.flow_add_by_id(portal, user, int(match.group(1)))
    except AccessDenied:
        return JsonResponse(
            {"error": _("You cannot see this flow, or it does not exist.")}, status=404
        )
    except (portal_services.ReopenRequired, portal_services.ReinstallRequired):
        return JsonResponse({"error": problem_text(PinIntent.Problem.REOPEN)}, status=409)
    except TransientError:
        return JsonResponse({"error": problem_text(PinIntent.Problem.UNAVAILABLE)}, status=503)
    return JsonResponse(
        {
            "flow": {
                "id": info.flow_id,
                "name": info.name,
                "active": info.active,
                "efficiency": info.efficiency,
            }
        }
    )
