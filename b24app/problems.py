"""Every failure a user can see, by code, and the one place its words come from.

A problem code is what the app stores (a pin intent's `problem`), sends to the page (which
shows the words it was given, or picks a notice by code) and logs. Typed errors carry one:
`exc.problem` is the one to show. Requests refused at the door raise `Refused`.
"""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import models
from django.utils import translation
from django.utils.translation import gettext as _

from b24app import langs


class Problem(models.TextChoices):
    NONE = "", "none"
    DENIED = "denied", "the user can no longer see the flow"
    RATE_LIMITED = "rate_limited", "waiting for the portal's rate limit"
    UNAVAILABLE = "unavailable", "the portal is not answering"
    REOPEN = "reopen", "the user must reopen the app"
    REINSTALL = "reinstall", "the app must be reinstalled"
    GAVE_UP = "gave_up", "the state could not be confirmed"
    INTERNAL = "internal", "the app failed repeatedly"
    # A fetch of the user's flow list failed: the portal was busy, or refused the list.
    LIST_BUSY = "busy", "the portal did not list the flows yet"
    LIST_REFUSED = "failed", "the portal refused to list the flows"
    NOT_VISIBLE = "not_visible", "no such flow, or the user cannot see it"
    QUEUE_DOWN = "queue_down", "the pin queue is not reachable"
    APP_UNAVAILABLE = "app_unavailable", "Redis is not answering"
    TOO_MANY_PENDING = "too_many_pending", "the user has too many pins waiting"
    NOT_SAVED = "not_saved", "a click was not recorded"


def words(problem: str, language: str | None = None) -> str:
    """The words the page shows for `problem` ("" for none), from the catalogs (locale/): in
    `language` when given (a Django language; one the app does not ship falls back as
    `langs.shipped` says, so a worker can speak a stored user's language), else in the active
    language."""
    if language is not None:
        with translation.override(langs.shipped(language)):
            return words(problem)
    texts: dict[str, str] = {
        Problem.DENIED: _("You can no longer see this flow."),
        Problem.RATE_LIMITED: _("Waiting for Bitrix24 (rate limit)…"),
        Problem.UNAVAILABLE: _("Bitrix24 is not answering; retrying…"),
        Problem.REOPEN: _("Please reopen the app: your Bitrix24 session has ended."),
        Problem.REINSTALL: _("The app must be reinstalled by an administrator."),
        Problem.GAVE_UP: _("Could not confirm the state with Bitrix24; try again."),
        Problem.INTERNAL: _("Flow Pins could not apply this; try again later."),
        Problem.LIST_BUSY: _(
            "Bitrix24 is busy and did not give us your flows yet. Reload the page in a minute."
        ),
        Problem.LIST_REFUSED: _(
            "Bitrix24 refused to list your flows. Check that the app has the “task” scope."
        ),
        Problem.NOT_VISIBLE: _("You cannot see this flow, or it does not exist."),
        Problem.QUEUE_DOWN: _(
            "The pin queue is not available right now. Your choice is saved and will be "
            "applied when it is back."
        ),
        Problem.APP_UNAVAILABLE: _("The app is briefly unavailable; try again in a minute."),
        Problem.TOO_MANY_PENDING: _(
            "Too many of your pins are still waiting; try again when they are done."
        ),
        Problem.NOT_SAVED: _("Your click was not saved; please try again."),
    }
    return texts.get(problem, "")


class Refused(Exception):
    """A request refused at the door: 400 when malformed, 401/403 when not trusted, 503 when
    something it needs (the OAuth server, Redis) could not be asked. The message is plain words
    and holds no secret; nothing was stored or changed. Frame POSTs and events answer it as
    plain text, the page's API as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


OVER_LIMITS = (RequestDataTooBig, TooManyFieldsSent)


def over_limits(exc: RequestDataTooBig | TooManyFieldsSent, sender: str = "Bitrix24") -> Refused:
    """Django's request limits (DATA_UPLOAD_MAX_*), raised when a view first reads the body,
    the POST or the query: refused in words like every other refusal, rather than as Django's
    bare 400 page; the frame door (b24app.views) and the page's JSON API (flows.apiauth) alike."""
    if isinstance(exc, RequestDataTooBig):
        return Refused(413, f"The request is too large: {sender} never sends one this big.")
    return Refused(400, f"The request has too many fields: {sender} never sends that many.")
