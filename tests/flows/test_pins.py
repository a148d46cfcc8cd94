"""Pins converge to the user's latest intent on a toggle-only API: the convergence service
against the simulated portal over HTTP, and the whole pipeline through a real Celery worker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.test import Client

from b24app.models import Portal, PortalUser
from flows import converge as engine
from flows import intents
from flows.models import PinIntent
from flows.outcome import Kind
from tests.helpers import install, open_app, portal_pins, sb, state, visible_to

pytestmark = pytest.mark.django_db(transaction=True)


def converge(user_id: int, rounds: int = 60) -> dict[str, int]:
    """Run the convergence the way the task does, retrying what it asks to retry."""
    portal = Portal.objects.get()
    total = {"runs": 0}
    for _ in range(rounds):
        total["runs"] += 1
        outcome = engine.converge_user(portal.pk, user_id)
        if outcome.kind is Kind.DONE:
            return {**outcome.stats, **total}
        if outcome.kind is Kind.FINAL:
            return total
        time.sleep(min(outcome.delay, 0.2))
    raise AssertionError("did not converge")


def want(user_id: int, flow_ids: list[int], pinned: bool) -> None:
    intents.set_desired(Portal.objects.get(), user_id, flow_ids, pinned)


@pytest.fixture
def portal(sandbox: Any) -> Any:
    client = Client()
    install(client, sandbox)
    for user_id in (2, 3):
        open_app(client, sandbox, user_id)
    return sandbox


def test_a_pin_toggles_once_for_the_clicking_user_only(portal: Any) -> None:
    flow = visible_to(portal, 2)[0]
    want(2, [flow], True)
    converge(2)
    assert portal_pins(portal, 2) == {flow}
    assert portal_pins(portal, 3) == set() and portal_pins(portal, 1) == set()
    intent = PinIntent.objects.get(user_id=2, flow_id=flow)
    assert (intent.status, intent.observed, intent.toggles) == ("done", True, 1)
    assert state(portal)["counters"]["pin_toggles"] == 1


def test_a_flow_pinned_in_bitrix24_itself_goes_round_again(portal: Any) -> None:
    flow = visible_to(portal, 2)[0]
    sb(portal, "p/alpha/pins", {"user_id": 2, "flow_ids": [flow], "pinned": True})
    want(2, [flow], True)  # the app did not know: the first toggle answers False
    converge(2)
    assert portal_pins(portal, 2) == {flow}
    assert PinIntent.objects.get(flow_id=flow, user_id=2).toggles == 2


def test_pin_unpin_pin_clicked_fast_ends_in_the_last_click(portal: Any) -> None:
    flow = visible_to(portal, 2)[0]
    for desired in (True, False, True):
        want(2, [flow], desired)
    converge(2)
    assert portal_pins(portal, 2) == {flow}
    want(2, [flow], False)
    want(2, [flow], True)
    want(2, [flow], False)
    converge(2)
    assert portal_pins(portal, 2) == set()


def test_a_flow_the_user_cannot_see_fails_in_words(portal: Any) -> None:
    hidden = sorted(set(visible_to(portal, 1)) - set(visible_to(portal, 2)))[0]
    want(2, [hidden], True)
    converge(2)
    intent = PinIntent.objects.get(flow_id=hidden, user_id=2)
    assert (intent.status, intent.problem) == ("failed", "denied")
    assert portal_pins(portal, 2) == set()


def test_120_pins_go_out_in_a_few_batches_with_every_state_right(portal: Any) -> None:
    sb(portal, "p/alpha/flows", {"count": 120, "visible_to_all": True})
    ids = [f["id"] for f in state(portal)["flows"] if "Generated" in f["name"] or f["id"] > 1000][
        :120
    ] or visible_to(portal, 2)
    ids = sorted(set(visible_to(portal, 2)))[:120]
    assert len(ids) == 120
    prepinned = ids[::3]  # a third pinned in Bitrix24 itself: they answer False first
    sb(portal, "p/alpha/pins", {"user_id": 2, "flow_ids": prepinned, "pinned": True})
    hidden = sorted(set(visible_to(portal, 1)) - set(visible_to(portal, 2)))[:3]
    want(2, ids + hidden, True)
    before = state(portal)["counters"]["calls"].get("batch", 0)
    converge(2)
    batches = state(portal)["counters"]["calls"].get("batch", 0) - before
    assert portal_pins(portal, 2) == set(ids)
    assert batches <= 5  # 123 pins: 3 batches, then one more for the pre-pinned third
    assert PinIntent.objects.filter(user_id=2, status="done").count() == 120
    assert set(
        PinIntent.objects.filter(user_id=2, status="failed").values_list("flow_id", flat=True)
    ) == set(hidden)
    assert state(portal)["counters"]["http_503"] == 0


def test_lost_answers_after_the_toggle_never_leave_a_wrong_state(portal: Any) -> None:
    sb(portal, "config", {"pin_drop_ratio": 0.3, "seed": 7})
    ids = visible_to(portal, 2)
    half = ids[: len(ids) // 2]
    sb(portal, "p/alpha/pins", {"user_id": 2, "flow_ids": half[:2], "pinned": True})
    want(2, half, True)
    converge(2)
    want(2, half[:1], False)
    converge(2)
    assert portal_pins(portal, 2) == set(half[1:])
    assert state(portal)["counters"]["dropped_responses"] > 0
    assert all(i.status == "done" for i in PinIntent.objects.filter(user_id=2))


def test_a_dead_token_asks_the_user_to_reopen(portal: Any) -> None:
    PortalUser.objects.filter(user_id=2).update(
        refresh_token="dead-refresh-token-0000", expires_at=None
    )
    flow = visible_to(portal, 2)[0]
    want(2, [flow], True)
    converge(2)
    intent = PinIntent.objects.get(flow_id=flow, user_id=2)
    assert (intent.status, intent.problem) == ("failed", "reopen")


# --- the endpoint and the real worker -----------------------------------------------------------


def click(client: Client, token: str, body: Any) -> Any:
    return client.post(
        "/flows/api/pin",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_X_FLOWPINS_TOKEN=token,
    )


def wait_done(client: Client, token: str, seconds: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = client.get("/flows/api/status", HTTP_X_FLOWPINS_TOKEN=token).json()["intents"]
        if data and all(i["status"] != "pending" for i in data):
            return list(data)
        time.sleep(0.2)
    raise AssertionError(f"still pending: {data}")


@pytest.mark.services
def test_clicks_converge_through_the_worker_for_two_users_at_once(
    sandbox: Any, celery_worker_process: Any
) -> None:
    client = Client()
    install(client, sandbox)
    token2, token3 = open_app(client, sandbox, 2), open_app(client, sandbox, 3)
    f2, f3 = visible_to(sandbox, 2)[:3], visible_to(sandbox, 3)[:2]
    assert click(client, token2, {"flow_ids": f2, "pinned": True}).status_code == 202
    assert click(client, token3, {"flow_ids": f3, "pinned": True}).status_code == 202
    done2, done3 = wait_done(client, token2), wait_done(client, token3)
    assert {i["flow_id"] for i in done2 if i["observed"]} == set(f2)
    assert {i["flow_id"] for i in done3 if i["observed"]} == set(f3)
    assert portal_pins(sandbox, 2) == set(f2) and portal_pins(sandbox, 3) == set(f3)
    assert all(i["message"] == "Pinned." for i in done2)
    # unpin one through the same path
    assert click(client, token2, {"flow_id": f2[0], "pinned": False}).status_code == 202
    wait_done(client, token2)
    assert portal_pins(sandbox, 2) == set(f2[1:])


def test_the_pin_endpoint_refuses_bad_input_and_records_nothing(portal: Any) -> None:
    client = Client()
    token = open_app(client, portal, 2)
    flow = visible_to(portal, 2)[0]
    cases = [
        ({"flow_id": flow}, 400),
        ({"flow_id": "12", "pinned": True}, 400),
        ({"flow_id": True, "pinned": True}, 400),
        ({"flow_ids": [], "pinned": True}, 400),
        ({"flow_ids": list(range(1, 600)), "pinned": True}, 400),
    ]
    for body, status in cases:
        assert click(client, token, body).status_code == status, body
    garbage = client.post(
        "/flows/api/pin", data="{nope", content_type="application/json", HTTP_X_FLOWPINS_TOKEN=token
    )
    assert garbage.status_code == 400
    assert (
        client.post(
            "/flows/api/pin",
            data=json.dumps({"flow_id": flow, "pinned": True}),
            content_type="application/json",
        ).status_code
        == 401
    )
    forged = token[:-3] + ("aaa" if not token.endswith("aaa") else "bbb")
    assert click(client, forged, {"flow_id": flow, "pinned": True}).status_code == 403
    assert PinIntent.objects.count() == 0


def test_a_page_token_acts_only_for_its_own_user_and_portal(portal: Any) -> None:
    client = Client()
    install(client, portal, "beta")
    beta_token = open_app(client, portal, 1, "beta")
    flow = visible_to(portal, 2)[0]
    assert click(client, beta_token, {"flow_id": flow, "pinned": True}).status_code in (202, 503)
    intent = PinIntent.objects.get()
    beta = Portal.objects.get(member_id=state(portal, "beta")["member_id"])
    assert intent.portal_id == beta.pk and intent.user_id == 1  # never alpha, never user 2
    status = client.get("/flows/api/status", HTTP_X_FLOWPINS_TOKEN=open_app(client, portal, 2))
    assert status.json()["intents"] == []  # alpha's user 2 sees none of beta's intents


def test_more_settled_intents_than_one_window_all_finish(portal: Any) -> None:
    sb(portal, "p/alpha/flows", {"count": 260, "visible_to_all": True})
    ids = sorted(set(visible_to(portal, 2)))[:260]
    want(2, ids, True)
    converge(2)
    want(2, ids, True)  # "Pin all" again: nothing to toggle, but every intent must settle
    before = state(portal)["counters"]["pin_toggles"]
    converge(2)
    assert PinIntent.objects.filter(user_id=2, status="pending").count() == 0
    assert state(portal)["counters"]["pin_toggles"] == before
    assert portal_pins(portal, 2) == set(ids)


@pytest.mark.services
def test_a_users_120_pins_through_the_worker_take_a_few_batch_requests(
    sandbox: Any, celery_worker_process: Any
) -> None:
    client = Client()
    install(client, sandbox)
    sb(sandbox, "p/alpha/flows", {"count": 120, "visible_to_all": True})
    token = open_app(client, sandbox, 2)
    ids = sorted(set(visible_to(sandbox, 2)))[:120]
    sb(sandbox, "p/alpha/pins", {"user_id": 2, "flow_ids": ids[::3], "pinned": True})
    before = state(sandbox)["counters"]["calls"].get("batch", 0)
    assert click(client, token, {"flow_ids": ids, "pinned": True}).status_code == 202
    done = wait_done(client, token)
    assert len(done) == 120 and all(i["observed"] is True for i in done)
    assert portal_pins(sandbox, 2) == set(ids)
    assert state(sandbox)["counters"]["calls"].get("batch", 0) - before <= 5
    assert state(sandbox)["counters"]["http_503"] == 0
