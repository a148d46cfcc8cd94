"""Error reports to Sentry (sentry-sdk, with its Django and Celery integrations), only when
SENTRY_DSN is set, with every secret scrubbed before an event or breadcrumb leaves the process.

Three layers, because each covers what the others cannot see:

1. **Names.** Any value under a secret-sounding key (`AUTH_ID`, `REFRESH_ID`,
   `APPLICATION_TOKEN`, `auth[...]`, `PLACEMENT_OPTIONS`, `Authorization`, `X-Flowpins-Token`,
   `Cookie`, `*token*`, `*secret*`, ...) anywhere in the event: request data, headers, query,
   breadcrumb data, extra, frame variables. A request marked with Django's
   `sensitive_post_parameters` (every Bitrix24 entry point is) shows no POST value at all.
2. **Known values.** Free text (exception messages, log breadcrumbs, URLs) carries a secret with
   no name next to it. Every occurrence of a secret this process knows is masked: the app's
   client secret, SECRET_KEY, B24_TOKEN_KEY, passwords in DATABASE_URL/REDIS_URL, the secret
   fields of the request being served, and every value layer 1 found in the same event.
3. **Shape.** A task or a library may put a portal's token into a message where nothing above
   knows it (a stored token passed where an id belongs: Django's "expected a number but got
   '…'"). Runs of 24+ letters and digits with both in them (Bitrix24's tokens are hex) are
   masked in free text; dashed ids (request and task ids) and Sentry's own ids are kept.

Sentry's own data collection is narrowed first: no local variables (decrypted tokens pass
through many of them under names no list can foresee), no cookies, no user, no SQL parameters,
no task arguments (ids only by contract), no bodies of our calls to portals or their answers;
headers and query parameters by Sentry's denylist plus ours. The incoming request's body is
kept (which fields a failing POST had helps), its values scrubbed by layer 1.

Each event is tagged with the request id, member_id, user id and task id of its request or task
(b24app.logcontext), so its log lines are one search away.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, quote_plus, urlsplit

from b24app.logcontext import current, current_request
from b24app.logging import redact

if TYPE_CHECKING:
    from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

FILTERED = "[Filtered]"

# Key parts (split on anything but letters and digits) and substrings that mark a secret.
_SECRET_PARTS = frozenset(
    {"auth", "token", "secret", "password", "passwd", "pwd", "authorization", "cookie"}
    | {"session", "sessionid", "csrftoken", "signature", "credentials", "dsn"}
)
_SECRET_SUBSTRINGS = (
    "token",
    "secret",
    "password",
    "auth_id",
    "refresh_id",
    "placement_options",
    "authorization",
    "cookie",
    "api_key",
    "apikey",
    "private_key",
)
# Sentry's own ids and the SDK's description of itself: kept as they are.
_KEEP_KEYS = frozenset(
    {"event_id", "trace_id", "span_id", "parent_span_id", "sid", "segment_id", "release"}
    | {"request_id", "member_id", "user_id", "task_id", "celery_task_id"}  # ids, not secrets
)
_KEEP_TREES = frozenset({"sdk", "modules"})
_SHAPE = re.compile(
    r"(?<![A-Za-z0-9+=])(?=[A-Za-z0-9+=]*[0-9])(?=[A-Za-z0-9+=]*[A-Za-z])[A-Za-z0-9+=]{24,}"
)
_MIN_KNOWN = 8  # shorter values would mask ordinary words


def secret_name(key: object) -> bool:
    normal = re.sub(r"[^a-z0-9]+", "_", str(key).lower()).strip("_")
    return bool(_SECRET_PARTS.intersection(normal.split("_"))) or any(
        s in normal for s in _SECRET_SUBSTRINGS
    )


def _configured_secrets() -> list[str]:
    from django.conf import settings

    found = [settings.B24_CLIENT_SECRET, settings.SECRET_KEY, settings.METRICS_TOKEN]
    found += [k.strip() for k in str(settings.B24_TOKEN_KEY).split(",")]
    found.append(str(settings.DATABASES.get("default", {}).get("PASSWORD") or ""))
    for url in (settings.REDIS_URL, getattr(settings, "CELERY_BROKER_URL", "")):
        found.append(urlsplit(str(url or "")).password or "")
    return found


def _request_secrets() -> list[str]:
    """The secret fields of the request being served: what was parsed of its POST (never parsed
    here: an over-large body is the view's to refuse), its query and its headers."""
    request = current_request()
    if request is None:
        return []
    found: list[str] = []
    sources: list[Mapping[str, Any]] = [request.GET, request.headers, request.COOKIES]
    parsed = getattr(request, "_post", None)
    if parsed is not None:
        sources.append(parsed)
    for source in sources:
        for key in source:
            if secret_name(key):
                values = source.getlist(key) if hasattr(source, "getlist") else [source[key]]
                for value in values:
                    found += str(value).split()  # "Bearer abc": the token alone too
    return found


def _named_values(value: Any, key: object = None) -> Iterable[str]:
    """Every string under a secret name in this (part of an) event."""
    if key is not None and secret_name(key):
        if isinstance(value, str):
            yield value
            yield from value.split()
        elif isinstance(value, Mapping | list | tuple):
            yield from (s for s in _strings(value))
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _named_values(v, k)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _named_values(v)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


class _Scrubber:
    def __init__(self, known: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in known:
            if len(secret) >= _MIN_KNOWN:
                forms.update({secret, quote(secret, safe=""), quote_plus(secret)})
        self.known = sorted(forms, key=len, reverse=True)

    def text(self, text: str) -> str:
        text = redact(text)
        for secret in self.known:
            if secret in text:
                text = text.replace(secret, FILTERED)
        return _SHAPE.sub(FILTERED, text)

    def value(self, value: Any, key: object = None) -> Any:
        if key in _KEEP_TREES or (key in _KEEP_KEYS and isinstance(value, str)):
            return value
        if key is not None and secret_name(key) and value not in (None, "", [], {}):
            return FILTERED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


def _scrubber(event: Mapping[str, Any]) -> _Scrubber:
    return _Scrubber([*_configured_secrets(), *_request_secrets(), *_named_values(event)])


def _hide_sensitive_post(event: dict[str, Any]) -> None:
    """Django's `sensitive_post_parameters` on the view: no POST value in the report."""
    request = current_request()
    marked = getattr(request, "sensitive_post_parameters", None) if request else None
    data = (event.get("request") or {}).get("data")
    if not marked or not isinstance(data, dict):
        return
    for key in data:
        if marked == "__ALL__" or key in marked:
            data[key] = FILTERED


def scrub_event(event: Event, hint: Hint) -> Event:
    """`before_send`: the event with every secret masked (never dropped: an error must still be
    reported; should this raise, Sentry drops the event rather than send it unscrubbed)."""
    raw = cast(dict[str, Any], event)
    _hide_sensitive_post(raw)
    tags = raw.setdefault("tags", {})
    for key, value in current().items():  # find the log lines of the same request or task
        tags.setdefault(key, str(value))
    return cast("Event", _scrubber(raw).value(raw))


def scrub_breadcrumb(crumb: Breadcrumb, hint: BreadcrumbHint) -> Breadcrumb:
    """`before_breadcrumb`: log lines and HTTP calls recorded for a later event."""
    return cast("Breadcrumb", _scrubber(crumb).value(crumb))


def init_sentry(dsn: str) -> None:
    """Report errors of this process (web or worker) to Sentry. A malformed DSN stops start-up
    (ImproperlyConfigured, naming SENTRY_DSN) rather than leaving errors unreported unnoticed."""
    import sentry_sdk
    from django.core.exceptions import ImproperlyConfigured
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.utils import BadDsn, Dsn

    try:
        Dsn(dsn)
    except BadDsn as exc:
        raise ImproperlyConfigured(f"SENTRY_DSN is not a Sentry DSN ({exc}).") from None
    sentry_sdk.init(
        dsn=dsn,  # the environment and release: SENTRY_ENVIRONMENT, SENTRY_RELEASE (the SDK's own)
        integrations=[DjangoIntegration(), CeleryIntegration(propagate_traces=False)],
        data_collection={
            "user_info": False,
            "cookies": {"mode": "off"},
            "http_headers": {"request": {"mode": "denylist", "terms": ["flowpins"]}},
            "url_query_params": {"mode": "denylist"},
            # The request's body (scrubbed here): not what we send to portals, nor their answers.
            "http_bodies": ["incoming_request"],
            "database_query_data": False,
            "queues": False,  # task arguments: ids only by contract, and none sent anyway
            # Decrypted tokens pass through many locals, under names no list can foresee.
            "stack_frame_variables": False,
        },
        before_send=scrub_event,
        before_breadcrumb=scrub_breadcrumb,
        # No sentry-trace/baggage headers on calls to portals or the OAuth server: they are not
        # ours, and the baggage names our Sentry project.
        trace_propagation_targets=[],
        traces_sample_rate=0.0,
    )
