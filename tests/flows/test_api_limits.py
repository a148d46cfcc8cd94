"""The page's API past Django's request limits (DATA_UPLOAD_MAX_MEMORY_SIZE, _NUMBER_FIELDS):
refused in JSON and in words — 413 for a body over the cap, 400 for too many query fields —
like every other refusal of the API, never Django's bare "Bad Request (400)" page, and nothing
recorded or asked of the portal. The same request under the limits goes through, so the limit
alone refused it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.conf import settings

from flows.models import PinIntent
from tests.helpers import state, visible_to

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "HTTP_X_FLOWPINS_TOKEN"


def _post(opened: dict[str, Any], path: str, body: dict[str, Any], size: int) -> Any:
    """`body` padded with an unused field to exactly `size` bytes of JSON."""
    bare = json.dumps({**body, "pad": ""})
    padded = json.dumps({**body, "pad": "x" * (size - len(bare))})
    assert len(padded) == size
    return opened["client"].post(
        path, data=padded, content_type="application/json", **{TOKEN: opened["token"]}
    )


def _refused_in_words(response: Any, status: int, words: str) -> None:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json"
    assert words in response.json()["error"]


def test_a_click_over_the_body_cap_is_refused_in_words_and_records_nothing(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    flow = visible_to(sandbox, 2)[0]
    cap = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    click = {"flow_ids": [flow], "pinned": True}

    _refused_in_words(_post(opened, "/flows/api/pin", click, cap + 1), 413, "too large")
    assert not PinIntent.objects.exists()

    assert _post(opened, "/flows/api/pin", click, cap).status_code == 202
    assert list(PinIntent.objects.values_list("flow_id", "desired")) == [(flow, True)]


def test_an_add_over_the_body_cap_is_refused_in_words_and_asks_the_portal_nothing(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    flow = {"flow": str(visible_to(sandbox, 2)[0])}
    cap = settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    def flow_gets() -> int:  # an add asks the portal for the flow (a list uses Flow.list)
        return int(state(sandbox)["counters"]["calls"].get("tasks.flow.Flow.get", 0))

    asked = flow_gets()
    _refused_in_words(_post(opened, "/flows/api/add", flow, cap + 1), 413, "too large")
    assert flow_gets() == asked

    assert _post(opened, "/flows/api/add", flow, cap).status_code in (200, 202)
    assert flow_gets() > asked


def test_a_status_query_with_too_many_fields_is_refused_in_words(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS

    def status(fields: int) -> Any:
        query = "&".join(f"f{i}=1" for i in range(fields))
        return opened["client"].get(f"/flows/api/status?{query}", **{TOKEN: opened["token"]})

    _refused_in_words(status(limit + 1), 400, "too many fields")
    assert status(limit).status_code == 200
