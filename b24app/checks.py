"""Start-up checks: the configured B24_TOKEN_KEY can read the tokens already stored; metrics
that are on reach one scrape from every process (a warning).

A key set that cannot decrypt them does not fail at start-up on its own: every page open, event
and pin would fail later, one by one, and a token that cannot be read cannot be refreshed either
(its refresh chain dies within days). So the web server, the worker and `manage.py check
--database default` (and `migrate`) refuse to start instead, naming the problem and the fix.

A few stored values are tried, not all: start-up must stay fast with many portals, and a key set
that misses the old key fails on the first value that key wrote. A database that does not answer
at start-up is logged and passes: an outage must not keep the app from starting (/healthz reports
it), and the refresh path refuses unreadable tokens on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections
from django.db.models import Model, TextField
from django.db.models.functions import Cast

from b24app import crypto, metrics
from b24app.models import Portal, PortalUser

log = logging.getLogger(__name__)

SAMPLE = 5  # stored values tried per model

UNREADABLE = (
    "B24_TOKEN_KEY cannot decrypt tokens stored with an earlier key: put the old key back after "
    "the new one (B24_TOKEN_KEY=new,old), run `python manage.py rotate_token_key`, then drop it."
)


def raw_values(model: type[Model], fields: Sequence[str], rows: Any) -> list[str]:
    """The stored (still encrypted) values of `fields` in `rows`, empty ones left out.

    Cast to plain text so the encrypted field does not decrypt them on the way out (it would
    raise on the first unreadable one)."""
    casts = {f"raw_{name}": Cast(name, output_field=TextField()) for name in fields}
    found: list[str] = []
    for row in rows.values(**casts):
        found += [value for value in row.values() if value]
    return found


def _sample() -> list[str]:
    # The least recently written rows first: a value the old key wrote and nothing rewrote since
    # is the one a key set without that key cannot open.
    portals = Portal.objects.exclude(application_token="").order_by("updated_at", "pk")
    users = PortalUser.objects.exclude(access_token="", refresh_token="").order_by(
        "last_seen_at", "pk"
    )
    return raw_values(Portal, ["application_token"], portals[:SAMPLE]) + raw_values(
        PortalUser, ["access_token", "refresh_token"], users[:SAMPLE]
    )


def token_key_problem(using: str = "default") -> str | None:
    """The start-up refusal when B24_TOKEN_KEY cannot read stored tokens, else None.

    Never names a key or a token: the message goes to logs and terminals."""
    try:
        tables = connections[using].introspection.table_names()
        if Portal._meta.db_table not in tables or PortalUser._meta.db_table not in tables:
            return None  # not migrated yet: nothing stored
        sample = _sample()
    except DatabaseError as exc:
        log.warning(
            "start-up: could not read stored tokens to check B24_TOKEN_KEY (%s); starting anyway",
            type(exc).__name__,
        )
        return None
    unreadable = sum(1 for value in sample if not crypto.readable(value))
    if not unreadable:
        return None
    return f"{UNREADABLE} ({unreadable} of {len(sample)} sampled stored values are unreadable.)"


def check_token_key(
    app_configs: Sequence[Any] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[checks.CheckMessage]:
    """System check (tag `database`: run by `check --database default` and by `migrate`)."""
    if not databases or "default" not in databases:
        return []
    problem = token_key_problem()
    return [checks.Error(problem, id="b24app.E001")] if problem else []


def refuse_unreadable_tokens() -> None:
    """For the processes that serve (gunicorn, the Celery worker): raise rather than start."""
    try:
        problem = token_key_problem()
    finally:
        # This runs before gunicorn threads or worker pool processes exist: leave no connection
        # behind for them to inherit.
        connections.close_all()
    if problem:
        raise ImproperlyConfigured(problem)


METRICS_ALONE = (
    "METRICS_TOKEN is set but PROMETHEUS_MULTIPROC_DIR is not: every process counts alone, so a "
    "scrape (answered by one web process) never shows the Celery worker's counts (its REST "
    "calls, pins settled, token refreshes) nor the other web processes'."
)


def check_metrics_directory(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """System check: metrics on, but without the directory every process writes them to."""
    if not settings.METRICS_TOKEN or metrics.MULTIPROC_DIR:
        return []
    hint = (
        "Set PROMETHEUS_MULTIPROC_DIR to one directory every web and worker process can write, "
        "emptied before they start (make run and compose set it)."
    )
    return [checks.Warning(METRICS_ALONE, hint=hint, id="b24app.W001")]
