"""`GET /healthz`: 200 when the database and the broker answer, 503 naming what is down."""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

log = logging.getLogger(__name__)


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return bool(cursor.fetchone() == (1,))
    except Exception:
        log.warning("health: database check failed", exc_info=True)
        return False


def broker_ok() -> bool:
    try:
        client = redis.Redis.from_url(
            settings.CELERY_BROKER_URL, socket_connect_timeout=1, socket_timeout=1
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        log.warning("health: broker check failed", exc_info=True)
        return False


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    checks = {"database": database_ok(), "broker": broker_ok()}
    down = [name for name, ok in checks.items() if not ok]
    if down:
        return JsonResponse(
            {"status": "unavailable", "down": down, "message": f"{', '.join(down)} not answering"},
            status=503,
        )
    return JsonResponse({"status": "ok", "database": "ok", "broker": "ok"})


@require_GET
def ping(request: HttpRequest) -> HttpResponse:
    """Liveness only: no database, no broker. Also the bare baseline of the benchmarks."""
    return HttpResponse("ok\n", content_type="text/plain")
