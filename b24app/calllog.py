"""The REST call log: one metadata row per request to a portal (never a secret), kept
B24_CALL_LOG_DAYS (the Market asks for three days at least)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from b24app import metrics
from b24app.bitrix.client import CallRecord
from b24app.models import RestCall

log = logging.getLogger(__name__)
_metrics_failure_logged = False


def record_call(record: CallRecord) -> None:
    """Log the call (the row first: the Market requires it), then count it in the metrics."""
    global _metrics_failure_logged
    RestCall.objects.create(
        member_id=record.member_id,
        method=record.method[:100],
        http_status=record.http_status,
        error=record.error,
        duration_ms=record.duration_ms,
        commands=record.commands,
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
