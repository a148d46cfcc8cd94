"""The page Bitrix24 opens in its frame: the user's flows at once, from the latest snapshot.

What does not depend on the request is kept: the page's HTML per language and state (the
shell), and the sorted rows per snapshot version (`flows.rows`).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import get_script_prefix
from django.utils import translation
from django.utils.html import escape
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.utils.translation import ngettext, trans_real

from b24app.models import Portal, PortalUser
from b24app.placements import FrameRequest
from b24app.problems import Problem, words
from flows import adminview, intents, pinread, snapshots, tasks
from flows.apiauth import MAX_FLOWS_PER_REQUEST, page_token
from flows.listing import REFRESH_SKIP_SECONDS
from flows.rows import json_for_script, sorted_rows

log = logging.getLogger(__name__)

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


# Where the per-request values go in a rendered shell: private-use characters, which no
# template text holds and autoescaping leaves alone.
_SLOT = re.compile("\ue000fp-slot-(\\w+)\ue000")
_SLOTS = ("domain", "csp_nonce", "page_token", "page_js", "rows_json")
# Why the list is not there yet, as a notice the page shows by code (and switches by the `rows`
# endpoint's answer): each problem a fetch of the list ends with, and the notice's tone.
LIST_PROBLEMS = {
    Problem.REOPEN: "err",
    Problem.REINSTALL: "err",
    Problem.LIST_BUSY: "warn",
    Problem.LIST_REFUSED: "err",
}
_SHELLS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _slot(name: str) -> str:
    return f"\ue000fp-slot-{name}\ue000"


def _shell(loading: bool, problem: str) -> tuple[str, ...]:
    """The page rendered with a slot for each per-request value, split at the slots (odd
    items name a slot). Per language, state and deployment; rendered anew under DEBUG, where
    templates change."""
    lang = translation.get_language() or "en"
    key = (
        lang,
        str(loading),
        problem,
        settings.B24_JS_SDK_URL,
        get_script_prefix(),
        str(settings.FLOWPINS_READ_PINS),
    )
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
                "read_pins": settings.FLOWPINS_READ_PINS,
                "list_problems": [
                    (code, tone, words(code)) for code, tone in LIST_PROBLEMS.items()
                ],
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
        "not_read": _("state not read yet"),
        "checking": _("Checking your pins in Bitrix24…"),
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
    request: HttpRequest, *, portal: Portal, user: PortalUser, state_json: str | None = None
) -> HttpResponse:
    """Render the user's flows at once from the latest snapshot; never wait on the portal here.

    The snapshot is refreshed in the background unless it is only seconds old, and the page
    updates in place when the refresh lands (`rows` endpoint); with none yet (the first open)
    the page shows a loading state and fills in.

    What does not depend on the request is kept: the page's HTML per language and state (the
    shell), and the sorted rows per snapshot version; a render reads the snapshot's version,
    the user's intents, and fills in the user's values. `state_json`: the user's intents (and
    whether their pins were ever read) as read with the portal and the user
    (intents.PAGE_STATE), when they were.
    """
    status = snapshots.status(portal, user.user_id)
    rows = sorted_rows(portal, user.user_id, status.meta) if status.exists else None
    loading = rows is None
    if rows is None or time.time() - rows.fetched_at >= REFRESH_SKIP_SECONDS:
        try:
            tasks.request_snapshot_refresh(portal.pk, user.user_id, interactive=True)
        except Exception:  # the broker is down: what there is is still worth showing
            log.warning("could not queue a snapshot refresh")
    if state_json is not None:
        asked, by_flow = intents.page_state_from_json(state_json)
    else:
        asked, by_flow = intents.read_asked(portal, user), intents.by_flow(portal, user)
    if not asked:
        _first_read(portal.pk, user.user_id)
    lang = translation.get_language() or "en"
    problem = status.problem if loading and status.problem in LIST_PROBLEMS else ""
    page_js = {
        "version": rows.version if rows else None,
        "refresh_seconds": PAGE_REFRESH_SECONDS,
        "fast_poll_seconds": PAGE_FAST_POLL_SECONDS,
        "chunk": MAX_FLOWS_PER_REQUEST,
        "plurals": _page_plurals(lang),
        # Whether the portal calls this user an administrator (None: being asked): the
        # script then asks for the admin's section, which the server gives only to them.
        "admin": adminview.on_open(portal.pk, user.user_id),
    }
    html = _fill(
        _shell(loading, problem),
        {
            "domain": escape(portal.domain),
            "csp_nonce": escape(getattr(request, "csp_nonce", "")),
            "page_token": escape(page_token(portal, user, lang)),
            "page_js": json_for_script(page_js),
            "rows_json": rows.json(by_flow) if rows else "[]",
        },
    )
    return HttpResponse(html, content_type="text/html; charset=utf-8")


def _first_read(portal_id: int, user_id: int) -> None:
    """The user's first open: read their real pin states (toggle pairs, `flows.pinread`) in
    their next convergence run, which starts once their list is there."""
    try:
        if pinread.request(portal_id, user_id, first_only=True):
            tasks.enqueue_converge(portal_id, user_id, bulk=True)
    except Exception:  # the broker is down: the sweep starts the run once it is back
        log.warning("could not queue the first read of a user's pins")


def app_view(request: FrameRequest) -> HttpResponse:
    """The flows page as a placement's view (registered in `flows.apps`)."""
    also = request.frame.also  # read with the portal and the user (intents.PAGE_STATE)
    state_json = also if isinstance(also, str) else None  # None: a user never seen before
    return app_page(request, portal=request.portal, user=request.b24user, state_json=state_json)
