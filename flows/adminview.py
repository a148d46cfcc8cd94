"""The admin's view: a status section of the flows page that only the portal's administrators
get — the install and its bindings, today's REST budget, the users, the pins that failed in
the last day and why, and a button that binds the handlers again.

Who is an administrator is the portal's own `user.admin` answer for the user's token, asked
by a worker when the user opens the app and kept briefly (`b24app.status`); never what a page
says. The page renders without it; its script asks `admin` for the section, which answers 202
while the portal has not answered yet, 403 to anyone the portal does not call an admin, and
the section (HTML rendered here, figures as JSON) to an admin. Nothing here calls the portal.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from b24app import status
from b24app.models import Portal, PortalUser
from b24app.problems import Problem, Refused, words
from b24app.redisconn import redis_client
from flows import admintasks
from flows.apiauth import api
from flows.models import PinIntent

log = logging.getLogger(__name__)

# A read of the bindings older than this is asked again when an admin looks at the section.
BINDINGS_FRESH_SECONDS = 60
# A re-binding whose read has not come back within this long is reported as unconfirmed.
REBIND_WAIT_SECONDS = 120
FAILED_WINDOW = timedelta(hours=24)


def on_open(portal_id: int, user_id: int) -> bool | None:
    """For the page as it renders: whether the portal called this user an administrator
    (None: not known; a worker is asked, and the page's script learns it from `admin`)."""
    if not settings.FLOWPINS_ADMIN_VIEW:
        return False
    try:
        answer = status.admin_answer(portal_id, user_id)
        if answer is None:
            admintasks.request_admin_check(portal_id, user_id)
    except Exception:  # Redis or the broker is down: the page is still worth showing
        log.warning("could not look up or ask whether a user is an administrator")
        return None
    return answer


@dataclass(frozen=True)
class FailedPins:
    problem: str
    words: str
    pins: int
    users: int


def failed_pins(portal: Portal) -> list[FailedPins]:
    """Pins that failed in the last 24 hours, grouped by why, the commonest first."""
    since = timezone.now() - FAILED_WINDOW
    groups = (
        PinIntent.objects.filter(
            portal=portal, status=PinIntent.Status.FAILED, updated_at__gte=since
        )
        .values("problem")
        .annotate(pins=Count("id"), users=Count("user_id", distinct=True))
        .order_by("-pins", "problem")
    )
    return [
        FailedPins(
            g["problem"], words(g["problem"]) or _("No reason was recorded."), g["pins"], g["users"]
        )
        for g in groups
    ]


def _rebind_key(portal_id: int) -> str:
    return f"fp:admin_rebind:{portal_id}"


def _rebind_state(portal_id: int, bindings: status.Bindings | None) -> tuple[str, str]:
    """The last re-binding asked from this section: ("", "") when none lately, else its state
    (running, done, unconfirmed) and its words."""
    raw = redis_client().get(_rebind_key(portal_id))
    if raw is None:
        return "", ""
    asked = float(json.loads(raw)["at"])
    if bindings is not None and bindings.rebind_at == asked:  # a read that followed this click
        when = timezone.localtime(datetime.fromtimestamp(asked, tz=UTC))
        at = when.strftime("%H:%M:%S %Z")
        if bindings.problem:
            text = _("Re-bound at %(time)s, but the bindings could not be read: %(reason)s") % {
                "time": at,
                "reason": words(bindings.problem),
            }
            return "done", text
        missing = bindings.missing()
        if missing:
            names = ", ".join(b.code for b in missing)
            return "done", _("Re-bound at %(time)s, but Bitrix24 still lacks: %(missing)s.") % {
                "time": at,
                "missing": names,
            }
        return "done", _("Re-bound at %(time)s: every handler is in place.") % {"time": at}
    if time.time() - asked > REBIND_WAIT_SECONDS:
        return "unconfirmed", _(
            "Bitrix24 has not confirmed the re-binding yet; try again in a minute."
        )
    return "running", _("Re-binding the handlers…")


def _install_words(portal: Portal) -> str:
    texts = {
        Portal.State.ACTIVE: _("Installed and active"),
        Portal.State.NEEDS_REINSTALL: _("Must be reinstalled"),
        Portal.State.UNINSTALLED: _("Uninstalled"),
    }
    return texts.get(Portal.State(portal.state), portal.state)


def section(portal: Portal, user: PortalUser) -> dict[str, Any]:
    """The section's figures (JSON) and its HTML, for an administrator of the portal."""
    bindings = status.stored_bindings(portal.pk)
    rebind, rebind_words = _rebind_state(portal.pk, bindings)
    stale = bindings is None or bindings.age >= BINDINGS_FRESH_SECONDS
    if stale and rebind != "running":
        try:
            admintasks.request_bindings_read(portal.pk, user.user_id)
        except Exception:  # the broker is down: the last read is shown with its age
            log.warning("could not queue a read of portal %s's bindings", portal.pk)
    used = status.rest_usage(portal.member_id, status.today_start())
    active, reopen = status.user_counts(portal)
    failed = failed_pins(portal)
    found = set(bindings.found) if bindings and not bindings.problem else set()
    expected = [
        {"kind": b.kind, "code": b.code, "bound": b in found} for b in status.expected_bindings()
    ]
    figures: dict[str, Any] = {
        "install": {"state": portal.state, "installed_at": portal.installed_at.isoformat()},
        "rest_today": {
            "calls": used.calls,
            "commands": used.commands,
            "errors": used.errors,
            "limited": used.limited,
        },
        "users": {"active": active, "reopen": reopen},
        "failed": [asdict(f) for f in failed],
        "bindings": {
            "read": bindings is not None,
            "age": round(bindings.age) if bindings else None,
            "problem": bindings.problem if bindings else "",
            "expected": expected,
        },
        "rebind": rebind,
    }
    html = render_to_string(
        "flows/admin_section.html",
        {
            "portal": portal,
            "install_words": _install_words(portal),
            "used": used,
            "rate": portal.rate_per_second or settings.B24_RATE_PER_SECOND,
            "burst": portal.rate_burst or settings.B24_RATE_BURST,
            "active": active,
            "reopen": reopen,
            "failed": failed,
            "bindings": bindings,
            "bindings_age": round(bindings.age) if bindings else 0,
            "bindings_problem": words(bindings.problem) if bindings and bindings.problem else "",
            "expected": expected,
            "rebind": rebind,
            "rebind_words": rebind_words,
        },
    )
    busy = rebind == "running" or bindings is None
    return {"figures": figures, "html": html, "busy": busy}


def _admin_or_refusal(portal: Portal, user: PortalUser) -> HttpResponse | None:
    """None for an administrator (the portal's answer); else the answer to send instead."""
    if not settings.FLOWPINS_ADMIN_VIEW:
        raise Refused(404, _("The administrator's view is turned off on this server."))
    answer = status.admin_answer(portal.pk, user.user_id)
    if answer is None:
        try:
            admintasks.request_admin_check(portal.pk, user.user_id)
        except Exception:
            raise Refused(503, words(Problem.QUEUE_DOWN)) from None
        return JsonResponse({"checking": True}, status=202)
    if not answer:
        raise Refused(403, _("Only an administrator of this Bitrix24 sees this section."))
    return None


@require_GET
@api
def admin_status(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """The section for an administrator of the portal (202 while the portal is being asked)."""
    refusal = _admin_or_refusal(portal, user)
    if refusal is not None:
        return refusal
    return JsonResponse(section(portal, user))


@require_POST
@api
def admin_rebind(request: HttpRequest, portal: Portal, user: PortalUser) -> HttpResponse:
    """Bind the app's handlers again (the install's task), then read back what Bitrix24 has."""
    refusal = _admin_or_refusal(portal, user)
    if refusal is not None:
        raise Refused(409, _("Still checking with Bitrix24 that you are an administrator."))
    key = _rebind_key(portal.pk)
    asked = time.time()
    redis_client().set(key, json.dumps({"at": asked}), ex=3 * REBIND_WAIT_SECONDS)
    try:
        admintasks.request_rebind(portal.pk, user.user_id, asked)
    except Exception:
        redis_client().delete(key)
        log.warning("could not queue a re-binding for portal %s", portal.pk)
        raise Refused(503, words(Problem.QUEUE_DOWN)) from None
    log.info("portal %s: an administrator asked to bind the handlers again", portal.pk)
    return JsonResponse(section(portal, user), status=202)
