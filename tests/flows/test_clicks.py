"""The cost of a click: one statement, and at most one more converge run per user while one is
in flight; refusals still in words, with nothing stored."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from b24app import lifecycle
from b24app.redisconn import redis_client
from flows import tasks
from flows.models import PinIntent
from tests.faults.drive import assert_all_done_and_true, wait_settled
from tests.faults.stack import wait_until
from tests.flows.conftest import USER
from tests.helpers import portal_pins, sb, state, visible_to

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


# How long the portal takes over each request in the in-flight test: the window clicks land in.
IN_FLIGHT_SECONDS = 2.5


@pytest.mark.services
@pytest.mark.parametrize(
    ("in_flight", "toggles"),
    [
        # Back to the state the toggle on its way leaves behind: nothing more to send.
        ([True, False], [False]),
        # Back to the state before it: exactly one more toggle, once its answer is in.
        ([True, False, True], [False, True]),
    ],
)
def test_clicks_while_a_toggle_is_at_the_portal_end_in_the_last_click_and_toggle_no_more(
    sandbox: Any,
    opened: dict[str, Any],
    celery_worker_process: Any,
    in_flight: list[bool],
    toggles: list[bool],
) -> None:
    """Pinned, then unpin, and while that toggle is still running at the portal, pin, unpin …
    The clicks change the intent only; the answer of the toggle on its way tells the state, and
    the portal ends in the last click with no toggle more than that needs."""
    client, token, portal = opened["client"], opened["token"], opened["portal"]
    flow = visible_to(sandbox, USER)[0]

    def log() -> list[dict[str, Any]]:
        return [
            e for e in state(sandbox)["pin_log"] if (e["user_id"], e["flow_id"]) == (USER, flow)
        ]

    assert click(client, token, {"flow_id": flow, "pinned": True}).status_code == 202
    wait_settled(30)
    assert portal_pins(sandbox, USER) == {flow} and len(log()) == 1  # pinned, and we know it

    sb(sandbox, "config", {"portal": "alpha", "latency_ms": IN_FLIGHT_SECONDS * 1000})
    assert click(client, token, {"flow_id": flow, "pinned": False}).status_code == 202
    lock = f"fp:conv:{portal.pk}:{USER}"
    wait_until(lambda: redis_client().exists(lock), 20, "the run that sends the unpin")
    time.sleep(0.3)  # the run has sent it: the portal holds it for IN_FLIGHT_SECONDS
    clicked = []
    for pinned in in_flight:
        clicked.append(time.time())  # the sandbox's clock is this machine's
        assert click(client, token, {"flow_id": flow, "pinned": pinned}).status_code == 202
    intents = wait_settled(60)
    # Judge once the unpin has landed: until then the portal may look right.
    sent = wait_until(lambda: log()[1:], 20, "the unpin to land")
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": None})
    time.sleep(0.5)  # a toggle sent after it would land by now
    sent = log()[1:]
    # The unpin landed after every click above, and the portal had it before the first: each
    # click was made while the toggle was running at the portal.
    landed = sent[0]["ts"]
    assert landed - IN_FLIGHT_SECONDS < clicked[0] and clicked[-1] < landed, (clicked, sent)
    assert portal_pins(sandbox, USER) == ({flow} if in_flight[-1] else set())
    assert_all_done_and_true(intents)
    assert [e["pinned"] for e in sent] == toggles, sent  # no toggle more than needed
