"""Reading the real pin state with toggle pairs: flows pinned in Bitrix24 itself show as pinned,
every user's pins in Bitrix24 stay exactly as they were, a broken pair is put back, a click
during a read wins, and Pin all then toggles only the flows that differ. Over the sandbox's
HTTP, running the convergence engine here (tests/flows/test_browser.py: with the worker)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from b24app.models import Portal
from flows import converge as engine
from flows import intents, pairs, pinread
from flows.models import PinIntent, PinRead
from flows.outcome import Kind
from tests.flows.conftest import USER
from tests.helpers import (
    api,
    install,
    open_app,
    portal_pins,
    sb,
    state,
    visible_to,
    wait_for_flow_list,
    worker_paused,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def reading(settings: Any) -> None:
    settings.FLOWPINS_READ_PINS = True


@pytest.fixture(autouse=True)
def _engine_here() -> Iterator[None]:
    """These tests run the convergence runs themselves, step by step."""
    with worker_paused():
        yield


def converge_all(user_id: int = USER, runs: int = 80) -> int:
    """Run the user's convergence (reads first) until nothing is left; the runs it took."""
    portal = Portal.objects.get()
    for run in range(1, runs + 1):
        outcome = engine.converge_user(portal.pk, user_id)
        if outcome.kind is Kind.DONE and not _read_wanted(portal, user_id):
            return run
        if outcome.kind is Kind.FINAL:
            raise AssertionError(f"the run stopped: {outcome}")
        time.sleep(min(outcome.delay, 0.2))
    raise AssertionError(f"did not settle: {outcome}")


def _read_wanted(portal: Portal, user_id: int) -> bool:
    return PinRead.objects.filter(
        portal=portal, user_id=user_id, requested_at__isnull=False
    ).exists()


def _pinned_beforehand(sandbox: Any, every: int = 3) -> tuple[list[int], set[int]]:
    """The user's flows, and every third of them pinned in Bitrix24 itself."""
    flows = visible_to(sandbox, USER)
    pinned = set(flows[::every])
    sb(sandbox, "p/alpha/pins", {"user_id": USER, "flow_ids": sorted(pinned), "pinned": True})
    return flows, pinned


def _open(sandbox: Any) -> tuple[Client, str]:
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, USER)
    wait_for_flow_list(state(sandbox)["member_id"], USER)
    return client, token


def _known(flows: list[int]) -> dict[int, bool | None]:
    found = dict(
        PinIntent.objects.filter(user_id=USER, flow_id__in=flows).values_list("flow_id", "observed")
    )
    return {fid: found.get(fid) for fid in flows}


def test_the_first_open_reads_the_real_states_and_leaves_every_pin_as_it_was(
    sandbox: Any, reading: None
) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    others = {uid: portal_pins(sandbox, uid) for uid in (1, 3)}
    client, token = _open(sandbox)
    assert PinRead.objects.get().requested_at is not None  # the open asked for a read
    before = state(sandbox)["counters"]
    converge_all()
    after = state(sandbox)["counters"]
    assert _known(flows) == {fid: fid in pinned for fid in flows}
    assert portal_pins(sandbox, USER) == pinned  # exactly as before the page was opened
    assert {uid: portal_pins(sandbox, uid) for uid in (1, 3)} == others
    # One request of the portal's budget per 25 flows, two toggles per flow.
    assert after["requests"] - before["requests"] == math.ceil(len(flows) / 25)
    assert after["pin_toggles"] - before["pin_toggles"] == 2 * len(flows)
    rows = api(client, token, "GET", "/flows/api/rows").json()["rows"]
    assert {r["id"]: (r["known"], r["pinned"]) for r in rows} == {
        fid: (True, fid in pinned) for fid in flows
    }
    assert rows[0]["pinned"]  # pinned first, as the page sorts them
    # Opening again asks for no second read.
    open_app(client, sandbox, USER)
    assert PinRead.objects.get().requested_at is None


@pytest.mark.parametrize(
    ("knob", "position"),
    [
        ("batch_fail_at", 1),  # the first pair's second toggle fails: left flipped
        ("batch_fail_at", 3),  # the second pair's
        ("batch_fail_at", 0),  # a first toggle fails: nothing ran for that flow
        ("batch_cut_at", 2),  # the portal dies between two pairs, the answer is lost
    ],
)
def test_a_read_broken_between_its_toggles_leaves_no_pin_changed(
    sandbox: Any, reading: None, knob: str, position: int
) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    _open(sandbox)
    sb(sandbox, "config", {"portal": "alpha", knob: position})  # INTERNAL_SERVER_ERROR
    outcome = engine.converge_user(Portal.objects.get().pk, USER)  # the read breaks
    assert outcome.kind is not Kind.FINAL  # it goes on: around the fault, or once it stops
    counters = state(sandbox)["counters"]
    assert counters["errors"].get("INTERNAL_SERVER_ERROR", 0) + counters["dropped_responses"] >= 1
    if knob == "batch_fail_at" and position % 2:
        # The pair's flow was left flipped, and the same run put it back with one toggle of
        # its own (a read records no toggles): the app knew which state the user had.
        restored = PinIntent.objects.filter(toggles=1)
        assert restored.exists()
        assert all(i.desired == (i.flow_id in pinned) for i in restored)
        assert portal_pins(sandbox, USER) == pinned
    sb(sandbox, "config", {"portal": "alpha", knob: -1})  # the fault stops
    converge_all()
    assert portal_pins(sandbox, USER) == pinned
    assert _known(flows) == {fid: fid in pinned for fid in flows}


def test_a_click_that_lands_during_a_read_wins(sandbox: Any, reading: None) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    _open(sandbox)
    clicked = next(fid for fid in flows if fid in pinned)  # the user unpins a pinned flow
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 800})
    portal = Portal.objects.get()
    run = threading.Thread(
        target=lambda: (engine.converge_user(portal.pk, USER), connection.close())
    )
    run.start()
    time.sleep(0.4)  # the read's request is on its way
    intents.set_desired(portal, USER, [clicked], False)
    run.join(30)
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 0})
    converge_all()
    assert portal_pins(sandbox, USER) == pinned - {clicked}
    assert PinIntent.objects.get(flow_id=clicked).desired is False
    # The click landed while its flow's pair was on the way (read, kept pending, then toggled
    # once), not before the read chose its flows (then it would not have been read at all).
    assert state(sandbox)["counters"]["pin_toggles"] == 2 * len(flows) + 1


def test_after_a_read_pin_all_toggles_only_the_flows_that_differ(
    sandbox: Any, reading: None
) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    client, token = _open(sandbox)
    converge_all()
    before = state(sandbox)["counters"]["pin_toggles"]
    shown_unpinned = [
        r["id"]
        for r in api(client, token, "GET", "/flows/api/rows").json()["rows"]
        if not r["pinned"]
    ]
    assert sorted(shown_unpinned) == sorted(set(flows) - pinned)  # what the page's Pin all sends
    answer = api(client, token, "POST", "/flows/api/pin", {"flow_ids": flows, "pinned": True})
    assert answer.status_code == 202
    converge_all()
    assert portal_pins(sandbox, USER) == set(flows)
    assert state(sandbox)["counters"]["pin_toggles"] - before == len(set(flows) - pinned)


def test_check_pins_reads_again_what_changed_in_bitrix24(sandbox: Any, reading: None) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    client, token = _open(sandbox)
    converge_all()
    changed = flows[1]  # the user pins it in Bitrix24 itself
    sb(sandbox, "p/alpha/pins", {"user_id": USER, "flow_ids": [changed], "pinned": True})
    assert _known([changed]) == {changed: False}  # the app cannot know yet
    assert api(client, token, "POST", "/flows/api/check", {}).status_code == 202
    assert pinread.in_flight(Portal.objects.get().pk, USER)
    converge_all()
    assert _known([changed]) == {changed: True}
    assert portal_pins(sandbox, USER) == pinned | {changed}


def test_with_reading_off_nothing_is_read_and_the_rows_say_so(sandbox: Any) -> None:
    flows, _ = _pinned_beforehand(sandbox)
    client, token = _open(sandbox)
    assert not PinRead.objects.exists()
    assert api(client, token, "POST", "/flows/api/check", {}).status_code == 404
    rows = api(client, token, "GET", "/flows/api/rows").json()["rows"]
    assert {r["known"] for r in rows} == {False}


def test_a_read_that_cannot_go_on_is_dropped_and_the_rows_stay_unknown(
    sandbox: Any, reading: None
) -> None:
    from b24app import tokens
    from b24app.models import PortalUser

    _pinned_beforehand(sandbox)
    client, token = _open(sandbox)
    portal = Portal.objects.get()
    tokens.mark_user_needs_reopen(PortalUser.objects.get(user_id=USER).pk, "test: session ended")
    before = state(sandbox)["counters"]["pin_toggles"]
    outcome = engine.converge_user(portal.pk, USER)
    assert outcome.kind is Kind.FINAL and outcome.reason == "reopen"
    assert not _read_wanted(portal, USER) and not pinread.in_flight(portal.pk, USER)
    assert state(sandbox)["counters"]["pin_toggles"] == before  # nothing was toggled
    assert not PinIntent.objects.exists()


def test_a_flow_the_user_may_not_pin_is_marked_and_the_read_goes_on(
    sandbox: Any, reading: None
) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    _open(sandbox)
    hidden = flows[1]  # taken away from the user after their list was fetched
    sb(sandbox, "p/alpha/flow", {"id": hidden, "access": ["U3"]})
    converge_all()
    refused = PinIntent.objects.get(flow_id=hidden)
    assert (refused.status, refused.problem, refused.observed) == ("failed", "denied", None)
    rest = [f for f in flows if f != hidden]
    assert _known(rest) == {f: f in pinned for f in rest}
    assert portal_pins(sandbox, USER) == pinned


def test_an_error_every_flow_would_get_stops_the_read_after_one_request(
    sandbox: Any, reading: None
) -> None:
    flows, pinned = _pinned_beforehand(sandbox)
    _open(sandbox)
    sb(
        sandbox,
        "config",
        {"portal": "alpha", "batch_fail_at": 0, "batch_fail_code": "ERROR_METHOD_NOT_FOUND"},
    )
    before = state(sandbox)["counters"]["requests"]
    outcome = engine.converge_user(Portal.objects.get().pk, USER)
    assert outcome.kind is Kind.FINAL
    assert state(sandbox)["counters"]["requests"] - before == 1  # not one request per flow
    assert not _read_wanted(Portal.objects.get(), USER)
    assert portal_pins(sandbox, USER) == pinned


def test_a_settled_pin_a_broken_pair_leaves_flipped_waits_from_the_read_not_its_click() -> None:
    """The oldest-pending gauge and the click-to-settled histogram count from `created_at`: a
    pin settled days ago that a broken read leaves flipped is pending from now; a pending
    click keeps its own time."""
    portal = Portal.objects.create(
        member_id="a" * 32,
        domain="alpha.bitrix24.com",
        client_endpoint="https://alpha.bitrix24.com/rest/",
        server_endpoint="https://oauth.bitrix.info/rest/",
    )
    days_ago = timezone.now() - timedelta(days=3)
    for flow_id, status in ((1, PinIntent.Status.DONE), (2, PinIntent.Status.PENDING)):
        PinIntent.objects.create(
            portal=portal, user_id=USER, flow_id=flow_id, desired=True, status=status
        )
    PinIntent.objects.update(created_at=days_ago)
    read_at = timezone.now()
    flipped = [pairs.PairAnswer(f, pairs.Seen.FLIPPED, True) for f in (1, 2)]
    pairs.record(portal.pk, USER, flipped)
    settled, clicked = PinIntent.objects.order_by("flow_id")
    assert (settled.status, settled.desired, settled.observed) == ("pending", True, False)
    assert settled.created_at >= read_at
    assert (clicked.status, clicked.created_at) == ("pending", days_ago)
