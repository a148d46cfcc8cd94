"""`GET /metrics`: the Prometheus scrape (b24app.metrics_facts), for whoever holds METRICS_TOKEN.

Off by default: without METRICS_TOKEN the URL does not exist (404). With it, a scrape sends
`Authorization: Bearer <METRICS_TOKEN>`; anything else is answered 401 with no data. The token is
compared in constant time (as digests, so not even its length shows).
"""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from b24app import metrics_facts


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _authorized(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        _digest(given.strip()), _digest(token)
    )


@never_cache
@require_GET
def scrape(request: HttpRequest) -> HttpResponse:
    token = settings.METRICS_TOKEN
    if not token:
        raise Http404("metrics are off")
    if not _authorized(request, token):
        response = HttpResponse(
            "A bearer token is required (Authorization: Bearer <METRICS_TOKEN>).\n",
            status=401,
            content_type="text/plain; charset=utf-8",
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body = generate_latest(metrics_facts.scrape_registry())
    return HttpResponse(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)
