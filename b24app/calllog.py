"""The REST call log: one metadata row per request to a portal (never a secret), kept
B24_CALL_LOG_DAYS (the Market asks for three days at least)."""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import cache

from django.conf import settings
from django.db import connection
from django.utils import timezone

from b24app import metrics
from b24app.bitrix.client import CallRecord
from b24app.models import RestCall
from b24app.rawsql import db_datetime

log = logging.getLogger(__name__)
_metrics_failure_logged = False


_COLUMNS = ("member_id", "method", "http_status", "error", "duration_ms", "commands", "created_at")


@cache
def _insert_sql() -> str:
    """The row's INSERT, written once: every REST request adds a row, and building it through
    the ORM each time (`objects.create`) was a noticeable part of a worker's CPU per request.
    The same row as `RestCall.objects.create` writes (no signals listen to it)."""
    meta = RestCall._meta
    quote = connection.ops.quote_name
    column = {field.name: field.column for field in meta.concrete_fields}
    columns = ", ".join(quote(column[name]) for name in _COLUMNS)
    values = ", ".join(["%s"] * len(_COLUMNS))
    # Only the model's own table and column names, quoted; every value is a parameter.
    return f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({values})"  # noqa: S608


def record_call(record: CallRecord) -> None:
    """Log the call (the row first: the Market requires it), then count it in the metrics."""
    global _metrics_failure_logged
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_sql(),
            [
                record.member_id,
                record.method[:100],
                record.http_status,
                record.error,
                record.duration_ms,
                record.commands,
                db_datetime(timezone.now()),
            ],
        )
    try:
        metrics.rest_call(
            record.method,
            record.http_status,
            record.error,
            record.duration_ms / 1000,
            record.commands,
        )
    except Exception as exc:  # a metric is not worth a failed call; logged once, its type only
        if not _metrics_failure_logged:  # (its text could hold what the portal answered)
            _metrics_failure_logged = True
            log.warning("REST calls are not being counted in the metrics: %s", type(exc).__name__)


def prune_call_log() -> int:
    cutoff = timezone.now() - timedelta(days=max(3, settings.B24_CALL_LOG_DAYS))
    deleted, _ = RestCall.objects.filter(created_at__lt=cutoff).delete()
    return deleted
