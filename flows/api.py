"""The page's JSON endpoints: a click (`pin`), the intents' status, the rows when the list
changes, and adding a flow by id or link."""

from __future__ import annotations

import logging
import re
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from b24app.bitrix.errors import AccessDenied, BitrixError, TransientError
from b24app.models import Portal, PortalUser
from b24app.problems import Problem, Refused, words
from flows import intents, listing, pinread, snapshots, tasks
from flows.apiauth import MAX_FLOWS_PER_REQUEST, PageClaims, api, api_claims, json_body, page_auth
from flows.listing import REFRESH_SKIP_SECONDS
from flows.models import PinIntent
from flows.rows import intent_json, rows_for
from flows.toggles import INTERACTIVE_TOGGLES

log = logging.getLogger(__name__)


@require_POST
@api_claims
def pin(request: HttpRequest, claims: PageClaims) -> HttpResponse:
    """Record the click and answer at once; a Celery task converges the portal to it.

    The hot path is one statement (intents.set_desired: known flows only, active portal,
    known user) and a look at the user's queued marker; the reason a click was refused is
    looked up only when it was."""
    body = json_body(request)
    raw_ids = body.get("flow_ids", [body.get("flow_id")])
    desired = body.get("pinned")
    if not isinstance(desired, bool):
        raise Refused(400, _("Say whether the flow should be pinned."))
    if not isinstance(raw_ids, list) or not raw_ids or len(raw_ids) > MAX_FLOWS_PER_REQUEST:
        raise Refused(400, _("Name the flows to pin."))
    flow_ids = _flow_ids(raw_ids)
    portal_id, user_id = claims.portal_id, claims.user_id
    if len(flow_ids) > 1:  # a single click cannot push the count far (and is the hot path)
        if intents.pending_room(portal_id, user_id) < len(flow_ids):
            raise Refused(429, words(Problem.TOO_MANY_PENDING))
    try:
        recorded = intents.set_desired(portal_id, user_id, flow_ids, desired, known_only=True)
    except intents.NotRecorded:
        return _not_recorded(request, portal_id, flow_ids)
    if any(i.status == PinIntent.Status.PENDING for i in recorded):
        try:
            tasks.enqueue_converge(portal_id, user_id, bulk=len(flow_ids) > INTERACTIVE_TOGGLES)
        except Exception:
            log.warning("could not queue pin work for portal %s", portal_id)
            return JsonResponse(
                {
                    "error": words(Problem.QUEUE_DOWN),
                    "intents": [intent_json(i) for i in recorded],
                },
                status=503,
            )
    return JsonResponse({"intents": [intent_json(i) for i in recorded]}, status=202)


def _not_recorded(request: HttpRequest, portal_id: int, flow_ids: list[int]) -> HttpResponse:
    """Why a click recorded nothing, in words: the portal or user is gone (page_auth says so),
    or some flow is not known on the portal."""
    page_auth(request)
    unknown = intents.unknown_flows(portal_id, flow_ids)
    if unknown:
        return JsonResponse(
            {
                "error": _("These flows are not known on your portal: %(ids)s.")
                % {"ids": ", ".join(str(i) for i in unknown[:10])},
                "unknown": unknown[:100],
            },
            status=400,
        )
    # Every check passes now: the portal learnt the flows, or the user opened the app, meanwhile.
    raise Refused(409, words(Problem.NOT_SAVED))


def _flow_ids(raw_ids: list[Any]) -> list[int]:
    """The flow ids a request names, each once; refused unless every one is a flow id."""
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**31 for i in raw_ids):
        raise Refused(400, _("Flow ids are positive whole numbers."))
    return list(dict.fromkeys(raw_ids))


@require_http_methods(["GET", "POST"])
@api
def status(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """The intents of the named flows (every intent of the user when none are named).

    The page POSTs `{"flow_ids": [...]}` (at most MAX_FLOWS_PER_REQUEST a request), so no URL
    grows with a Pin all; `GET ?ids=1,2,3` stays for short lists.
    """
    if request.method == "POST":
        raw_ids = json_body(request).get("flow_ids")
        if not isinstance(raw_ids, list) or len(raw_ids) > MAX_FLOWS_PER_REQUEST:
            limit = ngettext(
                "Name at most %(count)d flow a request.",
                "Name at most %(count)d flows a request.",
                MAX_FLOWS_PER_REQUEST,
            )
            raise Refused(400, limit % {"count": MAX_FLOWS_PER_REQUEST})
        ids = _flow_ids(raw_ids)
        if not ids:
            return JsonResponse({"intents": []})
    else:
        ids = [int(x) for x in request.GET.get("ids", "").split(",")[:1000] if _ID.match(x)]
    qs = PinIntent.objects.filter(portal=portal, user_id=user.user_id)
    if ids:
        qs = qs.filter(flow_id__in=ids)
    return JsonResponse({"intents": [intent_json(i) for i in qs]})


# Failures of an add that someone must act on; any other refusal reads as "cannot see it".
_ASK_SOMEONE = {Problem.REOPEN, Problem.REINSTALL}
_ID = re.compile(r"^[0-9]{1,10}$")  # ASCII only: "²".isdigit() is True, int("²") fails
_FLOW_ID_IN_TEXT = re.compile(r"([0-9]{1,10})(?!.*[0-9])", re.DOTALL)


def _seconds(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 10**6 else None


@require_GET
@api
def rows(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """The user's rows from the latest snapshot, for the open page to update itself in place.

    `since`: the snapshot version the page shows; when it is still the latest, the answer is
    "unchanged" without any rows (read from a small key, not the snapshot). `max_age`: the
    page wants a list no older than this many seconds; a refresh is queued when the snapshot
    is older (unless it is only seconds old, one is in flight, or the last one failed just now).
    The answer says whether a refresh is in flight, so the page knows to keep asking.
    """
    snap: snapshots.Snapshot | None = None
    meta = snapshots.meta(portal, user.user_id)
    if meta is None:  # none, or one written before snapshots had versions
        snap = snapshots.get(portal, user.user_id)
        if snap is None:
            problem = snapshots.problem(portal, user.user_id)
            if not problem:
                tasks.request_snapshot_refresh(portal.pk, user.user_id, interactive=True)
            return JsonResponse({"loading": True, "problem": problem})
        meta = snapshots.SnapshotMeta(version=snap.version, fetched_at=snap.fetched_at)
    refreshing = snapshots.refresh_or_read_in_flight(portal.pk, user.user_id)
    max_age = _seconds(request.GET.get("max_age"))
    if (
        max_age is not None
        and not refreshing
        and meta.age >= max(max_age, REFRESH_SKIP_SECONDS)
        and not snapshots.problem(portal, user.user_id)
    ):
        try:
            refreshing = tasks.request_snapshot_refresh(portal.pk, user.user_id)
        except Exception:  # the broker is down: the page keeps what it shows
            log.warning("could not queue a snapshot refresh")
    answer: dict[str, Any] = {
        "loading": False,
        "version": meta.version,
        "age": round(meta.age, 1),
        "refreshing": refreshing,
    }
    if request.GET.get("since") == str(meta.version):
        return JsonResponse({**answer, "unchanged": True})
    snap = snap or snapshots.get(portal, user.user_id)
    if snap is None:  # expired between the two reads
        return JsonResponse({"loading": True, "problem": ""})
    by_flow = intents.by_flow(portal, user)
    answer.update(version=snap.version, age=round(snap.age, 1), rows=rows_for(snap.flows, by_flow))
    return JsonResponse(answer)


@require_POST
@api
def add_flow(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """Add a flow by its id or a link to it (the last number in the text).

    Asked of the portal within the web deadline; if it is slower, the answer is "still
    checking" and a worker finishes the job (the flow then appears with the page's rows).
    """
    text = str(json_body(request).get("flow", ""))[:500]
    match = _FLOW_ID_IN_TEXT.search(text)
    if not match or int(match.group(1)) <= 0:
        raise Refused(400, _("Paste a flow id or a link to the flow."))
    flow_id = int(match.group(1))
    try:
        row = listing.add_by_id(portal, user, flow_id, deadline=True)
    except AccessDenied:
        return JsonResponse({"error": words(Problem.NOT_VISIBLE)}, status=404)
    except TransientError:  # slow, busy or rate-limited: a worker asks again without a deadline
        return _add_later(portal, user, flow_id)
    except BitrixError as exc:  # the user must reopen, the portal must reinstall, or a refusal
        shown = exc.problem if exc.problem in _ASK_SOMEONE else Problem.NOT_VISIBLE
        return JsonResponse({"error": words(shown)}, status=409)
    meta = snapshots.meta(portal, user.user_id)
    return JsonResponse(
        {
            "flow": row.as_json(),
            # The snapshot version that holds this flow: the page keeps the row it adds
            # against any older list it is sent.
            "version": meta.version if meta else None,
        }
    )


def _add_later(portal: Portal, user: PortalUser, flow_id: int) -> HttpResponse:
    """The portal was too slow for the web deadline: a worker finishes the add."""
    try:
        tasks.add_flow.delay(portal_id=portal.pk, user_id=user.user_id, flow_id=flow_id)
    except Exception:
        return JsonResponse({"error": words(Problem.UNAVAILABLE)}, status=503)
    return JsonResponse(
        {
            "pending": True,
            "message": _(
                "Bitrix24 is slow to answer; still checking. The flow will appear when it answers."
            ),
        },
        status=202,
    )


@require_POST
@api
def check_pins(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """Read the user's real pin states from Bitrix24 again ("Check pins in Bitrix24"): toggle
    pairs in the user's next convergence run (`flows.pinread`)."""
    if not settings.FLOWPINS_READ_PINS:
        raise Refused(404, _("Reading pins from Bitrix24 is turned off on this server."))
    if snapshots.meta(portal, user.user_id) is None:
        raise Refused(409, _("Your flows are still loading; check again in a moment."))
    pinread.request(portal.pk, user.user_id)
    try:
        tasks.enqueue_converge(portal.pk, user.user_id, bulk=True)
    except Exception:
        log.warning("could not queue a pin read for portal %s", portal.pk)
        raise Refused(503, words(Problem.QUEUE_DOWN)) from None
    return JsonResponse({"reading": True}, status=202)
