"""A portal that loses answers and a user who clicks fast, through the session's real worker.

The truth is what the simulated portal records per user (`pins`), never what the app believes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client

from b24app.models import RestCall
from b24app.problems import Problem
from flows.models import PinIntent
from tests.faults.drive import assert_all_done_and_true, click, desired_pins, wait_settled
from tests.helpers import install, open_app, portal_pins, sb, state, visible_to

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

# Pin all over 120 flows with a fifth of the answers lost, at the default limit (2 requests/s,
# burst 50). The issue asked for 30 s; the bucket alone puts the floor near 33 s and the app
# takes about 60 s here (README, "Lossy networks", has the arithmetic). The bound leaves room for
# a slower machine; the code before adaptive batches never settled this at all.
PIN_ALL_LOSSY_SECONDS = 90


def test_a_fifth_of_pin_answers_lost_after_the_toggle_still_ends_in_every_desired_state(
    sandbox: Any, celery_worker_process: Any
) -> None:
    client = Client()
    install(client, sandbox)
    tokens = {user: open_app(client, sandbox, user) for user in (2, 3)}
    f2, f3 = visible_to(sandbox, 2), visible_to(sandbox, 3)
    # One flow is already pinned in Bitrix24 itself: its first toggle answers "unpinned".
    sb(sandbox, "p/alpha/pins", {"user_id": 2, "flow_ids": [f2[0]], "pinned": True})
    sb(sandbox, "config", {"pin_drop_ratio": 0.2, "seed": 11})
    for flow in f2[:4]:  # one click per row, as on the page
        assert click(client, tokens[2], [flow], True).status_code == 202
    assert click(client, tokens[3], f3[:3], True).status_code == 202  # "Pin all"
    wait_settled(60)
    assert click(client, tokens[2], [f2[1]], False).status_code == 202
    assert click(client, tokens[3], [f3[0]], False).status_code == 202
    intents = wait_settled(60)

    assert portal_pins(sandbox, 2) == desired_pins(intents, 2) == set(f2[:4]) - {f2[1]}
    assert portal_pins(sandbox, 3) == desired_pins(intents, 3) == set(f3[1:3])
    assert portal_pins(sandbox, 1) == set() and portal_pins(sandbox, 4) == set()
    assert_all_done_and_true(intents)
    counters = state(sandbox)["counters"]
    assert counters["dropped_responses"] >= 2  # the fault really happened, more than once


def test_pin_unpin_pin_clicked_fast_ends_in_the_last_click(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """Clicks land while the previous toggle is still on its way to the portal."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, 2)
    a, b, c, d = visible_to(sandbox, 2)[:4]
    sb(sandbox, "config", {"latency_ms": 400})

    def play(sequences: dict[int, list[bool]]) -> None:
        for step in range(max(len(s) for s in sequences.values())):
            for flow, clicks in sequences.items():
                if step < len(clicks):
                    assert click(client, token, [flow], clicks[step]).status_code == 202
            time.sleep(0.25)  # faster than one round trip to the portal

    # From "never touched": the app does not know the state yet.
    play({a: [True, False, True], b: [True, False], c: [True, False, True, False], d: [True]})
    intents = wait_settled(60)
    assert portal_pins(sandbox, 2) == {a, d} == desired_pins(intents, 2)
    assert_all_done_and_true(intents)
    # From a known state: a click back to the last answer while a toggle is in flight.
    play({a: [False, True], b: [True, False], c: [True, False, True], d: [False, True, False]})
    intents = wait_settled(60)
    assert portal_pins(sandbox, 2) == {a, c} == desired_pins(intents, 2)
    assert_all_done_and_true(intents)


def _settle_timed(seconds: float) -> tuple[float, list[Any]]:
    started = time.monotonic()
    intents = wait_settled(seconds)
    return time.monotonic() - started, intents


def test_half_of_the_answers_lost_four_clicked_flows_settle_within_20_seconds(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """A batch whose answer is lost tells nothing about any of its flows: with half of the
    answers lost the requests shrink to single toggles, and a lost one costs a second's quiet
    for its own flow only — not a backoff that grows with every retry."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, 2)
    flows = visible_to(sandbox, 2)[:4]
    sb(sandbox, "p/alpha/pins", {"user_id": 2, "flow_ids": [flows[0]], "pinned": True})
    sb(sandbox, "config", {"pin_drop_ratio": 0.5, "seed": 7})
    for flow in flows:  # one click per row, as on the page
        assert click(client, token, [flow], True).status_code == 202
    took, intents = _settle_timed(20)

    assert portal_pins(sandbox, 2) == set(flows) == desired_pins(intents, 2)
    assert_all_done_and_true(intents)
    assert state(sandbox)["counters"]["dropped_responses"] >= 3, "the fault did not happen"
    print(f"50% of answers lost: 4 flows settled in {took:.1f} s")


def test_a_fifth_of_the_answers_lost_pin_all_over_120_flows_settles_in_time(
    sandbox: Any, celery_worker_process: Any
) -> None:
    client = Client()
    install(client, sandbox)
    sb(sandbox, "p/alpha/flows", {"count": 120, "visible_to_all": True})
    token = open_app(client, sandbox, 2)
    flows = visible_to(sandbox, 2)[-120:]
    # A few are pinned in Bitrix24 already: their first toggle answers "unpinned".
    sb(sandbox, "p/alpha/pins", {"user_id": 2, "flow_ids": flows[::10], "pinned": True})
    sb(sandbox, "config", {"pin_drop_ratio": 0.2, "seed": 7})
    assert click(client, token, flows, True).status_code == 202  # "Pin all"
    took, intents = _settle_timed(PIN_ALL_LOSSY_SECONDS)

    assert portal_pins(sandbox, 2) == set(flows) == desired_pins(intents, 2)
    assert_all_done_and_true(intents)
    assert state(sandbox)["counters"]["dropped_responses"] >= 10, "the fault did not happen"
    print(f"20% of answers lost: Pin all over 120 flows settled in {took:.1f} s")


def test_when_answers_stop_being_lost_the_pins_settle_within_seconds(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """Every answer lost for a while, then none: the pins follow within a few seconds of the
    fault's end, however long it lasted (the backoff starts afresh once answers come)."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, 2)
    flows = visible_to(sandbox, 2)[:4]
    sb(sandbox, "config", {"pin_drop_ratio": 1.0, "seed": 3})
    assert click(client, token, flows, True).status_code == 202
    time.sleep(15)
    lost = state(sandbox)["counters"]["dropped_responses"]
    assert 4 <= lost <= 40, f"{lost} requests in 15 s of lost answers"  # kept trying, gently
    sb(sandbox, "config", {"pin_drop_ratio": 0.0})
    took, intents = _settle_timed(10)

    assert portal_pins(sandbox, 2) == set(flows) == desired_pins(intents, 2)
    assert_all_done_and_true(intents)
    print(f"recovered {took:.1f} s after the fault stopped ({lost} lost answers before)")


def test_a_portal_that_answers_query_limit_exceeded_gets_every_pin_in_the_end(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """The portal's bucket is far smaller than the one we keep (another app on our IP): it
    answers 503 QUERY_LIMIT_EXCEEDED and runs nothing. The runs wait as it asks, the page says
    "waiting for the portal's rate limit" (not "not answering") meanwhile, and every pin lands."""
    client = Client()
    install(client, sandbox)
    tokens = {user: open_app(client, sandbox, user) for user in (2, 3)}
    f2, f3 = visible_to(sandbox, 2)[:4], visible_to(sandbox, 3)[:3]
    sb(sandbox, "p/alpha/pins", {"user_id": 2, "flow_ids": [f2[0]], "pinned": True})
    sb(sandbox, "config", {"portal": "alpha", "rate": 0.5, "burst": 1})  # we assume 2/s, 50
    for flow in f2:  # row by row: several runs and rounds at once
        assert click(client, tokens[2], [flow], True).status_code == 202
    assert click(client, tokens[3], f3, True).status_code == 202

    problems: set[str] = set()
    deadline = time.monotonic() + 60
    while PinIntent.objects.filter(status=PinIntent.Status.PENDING).exists():
        assert time.monotonic() < deadline, "pins still pending after 60 s"
        problems |= set(PinIntent.objects.values_list("problem", flat=True))
        time.sleep(0.05)
    intents = wait_settled(5, expected=len(f2) + len(f3))

    assert portal_pins(sandbox, 2) == desired_pins(intents, 2) == set(f2)
    assert portal_pins(sandbox, 3) == desired_pins(intents, 3) == set(f3)
    assert_all_done_and_true(intents)
    assert state(sandbox)["counters"]["http_503"] >= 1, "the portal never refused"
    assert RestCall.objects.filter(error="QUERY_LIMIT_EXCEEDED").exists()
    assert Problem.RATE_LIMITED in problems and Problem.UNAVAILABLE not in problems, problems


def test_operation_time_limit_inside_a_batch_waits_for_the_reset_and_toggles_each_flow_once(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """ "Pin all" over six flows is one batch; the portal's operating-time budget for the pin
    method runs out after three of them, and the other three answer OPERATION_TIME_LIMIT (not
    run). Those wait for the window to reset — the portal is not asked again meanwhile — and
    then are toggled, once each."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, 2)
    flows = visible_to(sandbox, 2)[:6]
    # Each pin "costs" 1 s of operating time, the budget is 2.5 s over a window of ten buckets
    # of 0.5 s: the fourth pin is refused, and the budget is back within 5 s.
    sb(
        sandbox,
        "config",
        {
            "portal": "alpha",
            "operating_cost": 1,
            "operating_limit": 2.5,
            "operating_bucket_seconds": 0.5,
        },
    )
    assert click(client, token, flows, True).status_code == 202  # "Pin all": one batch
    problems: set[str] = set()
    started = time.monotonic()
    while PinIntent.objects.filter(status=PinIntent.Status.PENDING).exists():
        # A minute's wait (no reset time known) would be far over this.
        assert time.monotonic() - started < 30, "pins still pending after 30 s"
        problems |= set(PinIntent.objects.values_list("problem", flat=True))
        time.sleep(0.05)
    intents = wait_settled(5, expected=len(flows))

    assert portal_pins(sandbox, 2) == desired_pins(intents, 2) == set(flows)
    assert_all_done_and_true(intents)
    truth = state(sandbox)
    toggled = [e["flow_id"] for e in truth["pin_log"] if e["user_id"] == 2]
    assert sorted(toggled) == flows  # each flow once: a refused command did not run
    # Refused inside the batch, three times, and never again: the method waited for the reset.
    assert truth["counters"]["errors"].get("OPERATION_TIME_LIMIT") == 3, truth["counters"]
    assert Problem.RATE_LIMITED in problems, problems
