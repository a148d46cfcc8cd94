"""The cost of a click: one statement, and at most one more converge run per user while one is
in flight; refusals still in words, with nothing stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from b24app import lifecycle
from flows import tasks
from flows.models import PinIntent
from tests.flows.conftest import USER
from tests.helpers import visible_to

pytestmark = pytest.mark.django_db(transaction=True)


def click(client: Client, token: str, body: Any) -> Any:
    return client.post(
        "/flows/api/pin",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_X_FLOWPINS_TOKEN=token,
    )


@pytest.fixture
def runs_queued(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The converge runs sent to the broker (not run: the test plays the worker)."""
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(
        tasks.converge, "apply_async", lambda *a, **kw: sent.append(kw.get("kwargs", {}))
    )
    return sent


def test_a_click_is_one_statement(
    sandbox: Any, opened: dict[str, Any], runs_queued: list[dict[str, Any]]
) -> None:
    flows = visible_to(sandbox, USER)[:3]
    client, token = opened["client"], opened["token"]
    with CaptureQueriesContext(connection) as queries:
        answer = click(client, token, {"flow_id": flows[0], "pinned": True})
    assert answer.status_code == 202
    assert len(queries.captured_queries) == 1, [q["sql"] for q in queries.captured_queries]
    [intent] = answer.json()["intents"]
    assert (intent["flow_id"], intent["desired"], intent["status"]) == (flows[0], True, "pending")
    stored = PinIntent.objects.get()
    assert (stored.user_id, stored.flow_id, stored.desired) == (USER, flows[0], True)
    # The same flow again: the row is updated in place, the latest click wins.
    assert click(client, token, {"flow_id": flows[0], "pinned": False}).status_code == 202
    again = PinIntent.objects.get()
    assert (again.pk, again.desired, again.status) == (stored.pk, False, "pending")
    # A bulk request also counts what is pending (the cap): two statements.
    with CaptureQueriesContext(connection) as queries:
        assert click(client, token, {"flow_ids": flows, "pinned": True}).status_code == 202
    assert len(queries.captured_queries) == 2
    assert PinIntent.objects.filter(desired=True).count() == 3


def test_clicks_while_a_run_is_in_flight_queue_at_most_one_more(
    sandbox: Any, opened: dict[str, Any], runs_queued: list[dict[str, Any]]
) -> None:
    flows = visible_to(sandbox, USER)[:4]
    client, token = opened["client"], opened["token"]
    portal = opened["portal"]
    assert click(client, token, {"flow_id": flows[0], "pinned": True}).status_code == 202
    assert runs_queued == [{"portal_id": portal.pk, "user_id": USER}]
    for turn in range(12):  # the run is queued or running: every click coalesces into it
        body = {"flow_id": flows[turn % 4], "pinned": turn % 3 == 0}
        assert click(client, token, body).status_code == 202
    assert len(runs_queued) == 1
    tasks.run_finished(portal.pk, USER)  # the run ends with clicks it may not have seen
    assert len(runs_queued) == 2
    for turn in range(5):
        assert click(client, token, {"flow_id": flows[turn % 4], "pinned": True}).status_code == 202
    assert len(runs_queued) == 2


def test_unknown_flows_and_a_gone_portal_store_nothing_and_say_why(
    sandbox: Any, opened: dict[str, Any], runs_queued: list[dict[str, Any]]
) -> None:
    client, token = opened["client"], opened["token"]
    known = visible_to(sandbox, USER)[0]
    answer = click(client, token, {"flow_ids": [known, 987654, 987655], "pinned": True})
    assert answer.status_code == 400
    assert "not known on your portal: 987654, 987655" in answer.json()["error"]
    assert answer.json()["unknown"] == [987654, 987655]
    single = click(client, token, {"flow_id": 987654, "pinned": True})
    assert single.status_code == 400
    assert PinIntent.objects.count() == 0 and runs_queued == []
    lifecycle.portal_uninstall(opened["portal"], clean=False)
    gone = click(client, token, {"flow_id": known, "pinned": True})
    assert gone.status_code == 403
    assert "not installed on this portal" in gone.json()["error"]
    assert PinIntent.objects.count() == 0 and runs_queued == []
