"""The page users see inside Bitrix24, and its small JSON endpoints.

The page is rendered by the verified app POST (b24app.views.app). It carries a short-lived signed
token bound to that portal and user, sent back in a header by the page's own requests — no
third-party cookie is needed inside the iframe.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.conf import settings
from django.core import signing
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.urls import get_script_prefix
from django.utils import translation
from django.utils.html import escape
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.utils.translation import ngettext, trans_real
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from redis.exceptions import RedisError

from b24app import stored, tokens
from b24app.bitrix.errors import AccessDenied, TransientError
from b24app.bitrix.ratelimit import take
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


@dataclass(frozen=True)
class PageClaims:
    """Who the signed page token speaks for, checked by its signature alone (no query)."""

    portal_id: int
    user_id: int


def page_claims(request: HttpRequest) -> PageClaims:
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
    portal_id, user_id = data.get("p"), data.get("u")
    if not isinstance(portal_id, int) or not isinstance(user_id, int):
        raise PageAuthError(403, _("This request was not issued by the app."))
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
        raise PageAuthError(403, _("The app is not installed on this portal any more."))
    return user.portal, user


# Per user and endpoint: requests a second and burst. Generous for a person (a click, a status
# poll every second, a Pin all in chunks of 500), tight for a script spending the portal's
# shared REST budget or the workers' time on everyone else's behalf.
API_LIMITS: dict[str, tuple[float, int]] = {
    "pin": (5.0, 30),
    "status": (10.0, 30),
    "rows": (5.0, 20),
    "add_flow": (0.5, 5),
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


def _api(view: Any, *, lookup: bool = True) -> Any:
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
        except PageAuthError as exc:
            return JsonResponse({"error": exc.message}, status=exc.status)
        except RedisError:  # the shared rate limit and the queue live in Redis
            log.warning("%s: Redis is not answering", view.__name__)
            return JsonResponse(
                {"error": _("The app is briefly unavailable; try again in a minute.")}, status=503
            )

    wrapped.__name__ = view.__name__
    return wrapped


def _api_claims(view: Any) -> Any:
    return _api(view, lookup=False)


# --- presenting intents -----------------------------------------------------------------------


def problem_text(problem: str) -> str:
    texts: dict[str, str] = {
        PinIntent.Problem.DENIED: _("You can no longer see this flow."),
        PinIntent.Problem.RATE_LIMITED: _("Waiting for Bitrix24 (rate limit)…"),
        PinIntent.Problem.UNAVAILABLE: _("Bitrix24 is not answering; retrying…"),
        PinIntent.Problem.REOPEN: _("Please reopen the app: your Bitrix24 session has ended."),
        PinIntent.Problem.REINSTALL: _("The app must be reinstalled by an administrator."),
        PinIntent.Problem.GAVE_UP: _("Could not confirm the state with Bitrix24; try again."),
        PinIntent.Problem.INTERNAL: _("Flow Pins could not apply this; try again later."),
    }
    return texts.get(problem, "")


class IntentState(NamedTuple):
    """What the page shows of an intent (a row of `_intents_by_flow`)."""

    flow_id: int
    desired: bool
    observed: bool | None
    status: str
    problem: str


def intent_json(intent: PinIntent | IntentState) -> dict[str, Any]:
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


@functools.cache
def _intents_sql(vendor: str) -> str:
    """The user's intents, as the page shows them. Built once: the ORM would build the same
    text again on every render, at about the cost of running it."""
    qn = connection.ops.quote_name
    columns = ", ".join(qn(c) for c in ("flow_id", "desired", "observed", "status", "problem"))
    table = qn(PinIntent._meta.db_table)
    return f"SELECT {columns} FROM {table} WHERE {qn('portal_id')} = %s AND {qn('user_id')} = %s"  # noqa: S608  (our names only)


def _intents_by_flow(portal: Portal, user: PortalUser) -> dict[int, IntentState]:
    with connection.cursor() as cursor:
        cursor.execute(_intents_sql(connection.vendor), [portal.pk, user.user_id])
        found = cursor.fetchall()
    return {
        int(flow_id): IntentState(
            int(flow_id), bool(desired), None if seen is None else bool(seen), status, problem
        )
        for flow_id, desired, seen, status, problem in found
    }


def _intents_expression(vendor: str) -> str:
    """The user's intents as one JSON text, read with the portal and the user when the app is
    opened (frame.AlsoRead): [[flow_id, desired, observed, status, problem], ...]."""
    qn = connection.ops.quote_name
    columns = ", ".join(
        f"i.{qn(c)}" for c in ("flow_id", "desired", "observed", "status", "problem")
    )
    if vendor == "postgresql":
        found = f"COALESCE(json_agg(json_build_array({columns})), '[]'::json)::text"
    elif vendor == "sqlite":
        found = f"json_group_array(json_array({columns}))"
    else:  # read on their own (_intents_by_flow)
        return "NULL"
    table = qn(PinIntent._meta.db_table)
    return (
        f"(SELECT {found} FROM {table} i "  # noqa: S608  (our names only)
        f"WHERE i.{qn('portal_id')} = p.{qn('id')} AND i.{qn('user_id')} = u.{qn('user_id')})"
    )


PAGE_INTENTS = stored.AlsoRead("intents", _intents_expression)


def _intents_from_json(text: str) -> dict[int, IntentState]:
    return {
        int(flow_id): IntentState(
            int(flow_id), bool(desired), None if seen is None else bool(seen), status, problem
        )
        for flow_id, desired, seen, status, problem in json.loads(text)
    }


def _by_name(flow: dict[str, Any]) -> tuple[str, int]:
    """The page's order within pinned and unpinned rows (both row builders use it)."""
    return str(flow["name"]).casefold(), int(flow["id"])


def _rows(flows: list[dict[str, Any]], intents: dict[int, IntentState]) -> list[dict[str, Any]]:
    rows = []
    for f in flows:
        intent = intents.get(int(f["id"]))
        pinned = bool(intent and intent.observed)
        rows.append({**f, "pinned": pinned, "intent": intent_json(intent) if intent else None})
    rows.sort(key=lambda r: (not r["pinned"], *_by_name(r)))
    return rows


# --- the page ---------------------------------------------------------------------------------


def json_for_script(value: Any) -> str:
    """JSON safe inside <script type="application/json">, like Django's json_script but without
    its per-character translate (a page of flows is tens of kilobytes)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003C").replace(">", "\\u003E")


# The open page asks for the snapshot's version this often (while it is visible), and for a
# refresh when the snapshot is older: one cheap request a user per interval.
PAGE_REFRESH_SECONDS = 30
# Right after an open (or a refresh the page asked for), it asks every second for this long
# at most, until the refreshed list has landed.
PAGE_FAST_POLL_SECONDS = 20


def _plural_table(n: int) -> int:
    """The active language's plural form for n (its catalog's Plural-Forms rule)."""
    catalog = trans_real.translation(translation.get_language() or "en")
    return int(catalog.plural(n))


def plurals_js(messages: dict[str, Callable[[int], str]]) -> dict[str, Any]:
    """Plural messages for the page's script, which has no ngettext: the form index of every n
    below 200 (past that, n's form is that of 100 + n % 100, which holds for every
    Plural-Forms rule built on n, n % 10 and n % 100), and each message's form per index."""
    index = [_plural_table(n) for n in range(200)]
    first = {i: index.index(i) for i in sorted(set(index))}
    forms = {
        key: [message(first.get(i, 0)) for i in range(max(index) + 1)]
        for key, message in messages.items()
    }
    return {"index": "".join(str(i) for i in index), "forms": forms}


# --- the page's rows, kept per snapshot version -------------------------------------------------


@dataclass(frozen=True)
class SortedRows:
    """A snapshot's flows in the page's order (name, then id) with each row's JSON as it is
    when the user has no intent for it: built once per snapshot version and process, then
    only the rows with intents are written again for a render."""

    version: int
    fetched_at: float
    ids: tuple[int, ...]
    flows: tuple[dict[str, Any], ...]
    fragments: tuple[str, ...]

    @classmethod
    def build(cls, snap: services.Snapshot) -> SortedRows:
        flows = sorted(snap.flows, key=_by_name)
        return cls(
            version=snap.version,
            fetched_at=snap.fetched_at,
            ids=tuple(int(f["id"]) for f in flows),
            flows=tuple(flows),
            fragments=tuple(json_for_script({**f, "pinned": False, "intent": None}) for f in flows),
        )

    def json(self, intents: dict[int, IntentState]) -> str:
        """The rows as `_rows` orders them (pinned first), as JSON for the page."""
        if not intents:
            return "[" + ",".join(self.fragments) + "]"
        pinned: list[str] = []
        rest: list[str] = []
        for flow_id, flow, fragment in zip(self.ids, self.flows, self.fragments, strict=True):
            intent = intents.get(flow_id)
            if intent is None:
                rest.append(fragment)
                continue
            row = {**flow, "pinned": bool(intent.observed), "intent": intent_json(intent)}
            (pinned if intent.observed else rest).append(json_for_script(row))
        return "[" + ",".join(pinned + rest) + "]"


class _RowsCache:
    """A small per-process LRU of SortedRows, keyed by portal, user, snapshot version and fetch
    time: a new version (a refresh landing, a flow added) is a new key, so a stale entry is
    never read, only pushed out. Nothing per request (token, nonce, intents) is kept here."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int, int, float], SortedRows] = OrderedDict()

    def get(self, key: tuple[int, int, int, float]) -> SortedRows | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[int, int, int, float], rows: SortedRows) -> None:
        with self._lock:
            self._entries[key] = rows
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


# Each entry is a user's list (200 flows: ~60 KB); the users who open the app within a
# snapshot's life on one process are what it is for.
ROWS_CACHE = _RowsCache(128)


def _sorted_rows(
    portal: Portal, user_id: int, meta: services.SnapshotMeta | None
) -> SortedRows | None:
    """The user's rows from the latest snapshot: from the cache when its version is known and
    kept here, else read, sorted and kept. None when there is no snapshot."""
    if meta is not None:
        cached = ROWS_CACHE.get((portal.pk, user_id, meta.version, meta.fetched_at))
        if cached is not None:
            return cached
    snap = services.snapshot_get(portal, user_id)
    if snap is None:
        return None
    rows = SortedRows.build(snap)
    ROWS_CACHE.put((portal.pk, user_id, snap.version, snap.fetched_at), rows)
    return rows


# --- the page shell, rendered once per language ---------------------------------------------------

# Where the per-request values go in a rendered shell: private-use characters, which no
# template text holds and autoescaping leaves alone.
_SLOT = re.compile("\ue000fp-slot-(\\w+)\ue000")
_SLOTS = ("domain", "csp_nonce", "page_token", "page_js", "rows_json")
_KNOWN_PROBLEMS = {"reopen", "reinstall", "busy", "failed"}
_SHELLS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _slot(name: str) -> str:
    return f"\ue000fp-slot-{name}\ue000"


def _shell(loading: bool, problem: str) -> tuple[str, ...]:
    """The page rendered with a slot for each per-request value, split at the slots (odd
    items name a slot). Per language, state and deployment; rendered anew under DEBUG, where
    templates change."""
    lang = translation.get_language() or "en"
    key = (lang, str(loading), problem, settings.B24_JS_SDK_URL, get_script_prefix())
    if len(_SHELLS) > 64:  # a handful in practice: languages × states; never unbounded
        _SHELLS.clear()
    shell = _SHELLS.get(key)
    if shell is None or settings.DEBUG:
        html = render_to_string(
            "flows/app.html",
            {
                "loading": loading,
                "problem": problem,
                "bx24_js": settings.B24_JS_SDK_URL,
                "messages_js": _page_messages(lang),
                **{name: mark_safe(_slot(name)) for name in _SLOTS},  # noqa: S308  (ours)
            },
        )
        shell = tuple(_SLOT.split(html))
        _SHELLS[key] = shell
    return shell


def _fill(shell: tuple[str, ...], values: dict[str, str]) -> str:
    return "".join(values[part] if i % 2 else part for i, part in enumerate(shell))


@functools.lru_cache(maxsize=8)
def _page_messages(lang: str) -> dict[str, str]:
    """The page script's texts in `lang` (the active language when called)."""
    return {
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
        "loading": _("Loading your flows from Bitrix24…"),
        "active": _("active"),
        "inactive": _("inactive"),
        "pinning_progress": _("Pinning %(done)s of %(total)s…"),
        "unpinning_progress": _("Unpinning %(done)s of %(total)s…"),
    }


@functools.lru_cache(maxsize=8)
def _page_plurals(lang: str) -> dict[str, Any]:
    """The page script's plural texts in `lang` (the active language when called)."""
    return plurals_js(
        {
            "pinned_n": lambda n: ngettext("%(count)s flow pinned", "%(count)s flows pinned", n),
            "unpinned_n": lambda n: ngettext(
                "%(count)s flow unpinned", "%(count)s flows unpinned", n
            ),
            "failed_n": lambda n: ngettext("%(count)s flow failed", "%(count)s flows failed", n),
        }
    )


def app_page(
    request: HttpRequest, *, portal: Portal, user: PortalUser, intents_json: str | None = None
) -> HttpResponse:
    """Render the user's flows at once from the latest snapshot; never wait on the portal here.

    The snapshot is refreshed in the background unless it is only seconds old, and the page
    updates in place when the refresh lands (`rows` endpoint); with none yet (the first open)
    the page shows a loading state and fills in.

    What does not depend on the request is kept: the page's HTML per language and state (the
    shell), and the sorted rows per snapshot version; a render reads the snapshot's version,
    the user's intents, and fills in the user's values. `intents_json`: the user's intents as
    read with the portal and the user (PAGE_INTENTS), when they were.
    """
    status = services.snapshot_status(portal, user.user_id)
    rows = _sorted_rows(portal, user.user_id, status.meta) if status.exists else None
    loading = rows is None
    if rows is None or time.time() - rows.fetched_at >= tasks.REFRESH_SKIP_SECONDS:
        try:
            tasks.request_snapshot_refresh(portal.pk, user.user_id, interactive=True)
        except Exception:  # the broker is down: what there is is still worth showing
            log.warning("could not queue a snapshot refresh")
    if intents_json is not None:
        intents = _intents_from_json(intents_json)
    else:
        intents = _intents_by_flow(portal, user)
    lang = translation.get_language() or "en"
    problem = status.problem if loading and status.problem in _KNOWN_PROBLEMS else ""
    page_js = {
        "version": rows.version if rows else None,
        "refresh_seconds": PAGE_REFRESH_SECONDS,
        "fast_poll_seconds": PAGE_FAST_POLL_SECONDS,
        "chunk": MAX_FLOWS_PER_REQUEST,
        "plurals": _page_plurals(lang),
    }
    html = _fill(
        _shell(loading, problem),
        {
            "domain": escape(portal.domain),
            "csp_nonce": escape(getattr(request, "csp_nonce", "")),
            "page_token": escape(page_token(portal, user, lang)),
            "page_js": json_for_script(page_js),
            "rows_json": rows.json(intents) if rows else "[]",
        },
    )
    return HttpResponse(html, content_type="text/html; charset=utf-8")


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
@_api_claims
def pin(request: HttpRequest, claims: PageClaims) -> HttpResponse:
    """Record the click and answer at once; a Celery task converges the portal to it.

    The hot path is one statement (services.pin_intent_set: known flows only, active portal,
    known user) and a look at the user's queued marker; the reason a click was refused is
    looked up only when it was."""
    body = _json_body(request)
    raw_ids = body.get("flow_ids", [body.get("flow_id")])
    desired = body.get("pinned")
    if not isinstance(desired, bool):
        return JsonResponse({"error": _("Say whether the flow should be pinned.")}, status=400)
    if not isinstance(raw_ids, list) or not raw_ids or len(raw_ids) > MAX_FLOWS_PER_REQUEST:
        return JsonResponse({"error": _("Name the flows to pin.")}, status=400)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**31 for i in raw_ids):
        return JsonResponse({"error": _("Flow ids are positive whole numbers.")}, status=400)
    flow_ids = list(dict.fromkeys(raw_ids))
    portal_id, user_id = claims.portal_id, claims.user_id
    try:
        if len(flow_ids) > 1:  # a single click cannot push the count far (and is the hot path)
            services.check_pending_room(portal_id, user_id, len(flow_ids))
    except services.TooMuchPending:
        return JsonResponse(
            {"error": _("Too many of your pins are still waiting; try again when they are done.")},
            status=429,
        )
    try:
        intents = services.pin_intent_set(portal_id, user_id, flow_ids, desired, known_only=True)
    except services.NotRecorded:
        return _not_recorded(request, portal_id, flow_ids)
    if any(i.status == PinIntent.Status.PENDING for i in intents):
        try:
            tasks.enqueue_converge(portal_id, user_id)
        except Exception:
            log.warning("could not queue pin work for portal %s", portal_id)
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


def _not_recorded(request: HttpRequest, portal_id: int, flow_ids: list[int]) -> HttpResponse:
    """Why a click recorded nothing, in words: the portal or user is gone (page_auth says so),
    or some flow is not known on the portal."""
    page_auth(request)
    unknown = services.unknown_flows(portal_id, flow_ids)
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
    return JsonResponse({"error": _("Your click was not saved; please try again.")}, status=409)


@require_http_methods(["GET", "POST"])
@_api
def status(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """The intents of the named flows (every intent of the user when none are named).

    The page POSTs `{"flow_ids": [...]}` (at most MAX_FLOWS_PER_REQUEST a request), so no URL
    grows with a Pin all; `GET ?ids=1,2,3` stays for short lists.
    """
    if request.method == "POST":
        raw_ids = _json_body(request).get("flow_ids")
        if not isinstance(raw_ids, list) or len(raw_ids) > MAX_FLOWS_PER_REQUEST:
            return JsonResponse(
                {
                    "error": ngettext(
                        "Name at most %(count)d flow a request.",
                        "Name at most %(count)d flows a request.",
                        MAX_FLOWS_PER_REQUEST,
                    )
                    % {"count": MAX_FLOWS_PER_REQUEST}
                },
                status=400,
            )
        if not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**31 for i in raw_ids
        ):
            return JsonResponse({"error": _("Flow ids are positive whole numbers.")}, status=400)
        if not raw_ids:
            return JsonResponse({"intents": []})
        ids = list(dict.fromkeys(raw_ids))
    else:
        ids = [int(x) for x in request.GET.get("ids", "").split(",")[:1000] if _ID.match(x)]
    qs = PinIntent.objects.filter(portal=portal, user_id=user.user_id)
    if ids:
        qs = qs.filter(flow_id__in=ids)
    return JsonResponse({"intents": [intent_json(i) for i in qs]})


_ID = re.compile(r"^[0-9]{1,10}$")  # ASCII only: "²".isdigit() is True, int("²") fails
_FLOW_ID_IN_TEXT = re.compile(r"([0-9]{1,10})(?!.*[0-9])", re.DOTALL)


def _seconds(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 10**6 else None


@require_GET
@_api
def rows(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """The user's rows from the latest snapshot, for the open page to update itself in place.

    `since`: the snapshot version the page shows; when it is still the latest, the answer is
    "unchanged" without any rows (read from a small key, not the snapshot). `max_age`: the
    page wants a list no older than this many seconds; a refresh is queued when the snapshot
    is older (unless it is only seconds old, one is in flight, or the last one failed just now).
    The answer says whether a refresh is in flight, so the page knows to keep asking.
    """
    snap: services.Snapshot | None = None
    meta = services.snapshot_meta(portal, user.user_id)
    if meta is None:  # none, or one written before snapshots had versions
        snap = services.snapshot_get(portal, user.user_id)
        if snap is None:
            problem = services.snapshot_problem(portal, user.user_id)
            if not problem:
                tasks.request_snapshot_refresh(portal.pk, user.user_id, interactive=True)
            return JsonResponse({"loading": True, "problem": problem})
        meta = services.SnapshotMeta(version=snap.version, fetched_at=snap.fetched_at)
    refreshing = tasks.refresh_in_flight(portal.pk, user.user_id)
    max_age = _seconds(request.GET.get("max_age"))
    if (
        max_age is not None
        and not refreshing
        and meta.age >= max(max_age, tasks.REFRESH_SKIP_SECONDS)
        and not services.snapshot_problem(portal, user.user_id)
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
    snap = snap or services.snapshot_get(portal, user.user_id)
    if snap is None:  # expired between the two reads
        return JsonResponse({"loading": True, "problem": ""})
    intents = _intents_by_flow(portal, user)
    answer.update(version=snap.version, age=round(snap.age, 1), rows=_rows(snap.flows, intents))
    return JsonResponse(answer)


@require_POST
@_api
def add_flow(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """Add a flow by its id or a link to it (the last number in the text).

    Asked of the portal within the web deadline; if it is slower, the answer is "still
    checking" and a worker finishes the job (the flow then appears with the page's rows).
    """
    text = str(_json_body(request).get("flow", ""))[:500]
    match = _FLOW_ID_IN_TEXT.search(text)
    if not match or int(match.group(1)) <= 0:
        return JsonResponse({"error": _("Paste a flow id or a link to the flow.")}, status=400)
    flow_id = int(match.group(1))
    try:
        info = services.flow_add_by_id(portal, user, flow_id, deadline=True)
    except AccessDenied:
        return JsonResponse(
            {"error": _("You cannot see this flow, or it does not exist.")}, status=404
        )
    except (tokens.ReopenRequired, tokens.ReinstallRequired):
        return JsonResponse({"error": problem_text(PinIntent.Problem.REOPEN)}, status=409)
    except TransientError:  # slow, busy or rate-limited: a worker asks again without a deadline
        try:
            tasks.add_flow.delay(portal_id=portal.pk, user_id=user.user_id, flow_id=flow_id)
        except Exception:
            return JsonResponse({"error": problem_text(PinIntent.Problem.UNAVAILABLE)}, status=503)
        return JsonResponse(
            {
                "pending": True,
                "message": _(
                    "Bitrix24 is slow to answer; still checking. "
                    "The flow will appear when it answers."
                ),
            },
            status=202,
        )
    meta = services.snapshot_meta(portal, user.user_id)
    return JsonResponse(
        {
            "flow": {
                "id": info.flow_id,
                "name": info.name,
                "active": info.active,
                "efficiency": info.efficiency,
            },
            # The snapshot version that holds this flow: the page keeps the row it adds
            # against any older list it is sent.
            "version": meta.version if meta else None,
        }
    )
