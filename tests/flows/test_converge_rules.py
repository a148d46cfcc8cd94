"""The convergence engine's rules, one at a time, in the test process (so `make mutate` can run
them against each mutant): a run is called here as the Celery task calls it, against the
sandbox over HTTP, with the intents in PostgreSQL and the lock, markers and counters in Redis.
What is checked is what a user sees: the pins Bitrix24 records, the intents' status and
problem, and when the next run comes."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import redis as redis_lib
from django.test import Client
from django.utils import timezone

from b24app import redisconn
from b24app.bitrix.errors import (
    BadRequest,
    OperationTimeLimit,
    RateLimited,
    ResponseLost,
    Unavailable,
)
from b24app.models import Portal, PortalUser
from b24app.problems import Problem
from flows import converge, intents, toggles
from flows.lock import UserLock
from flows.models import PinIntent
from flows.outcome import Kind, Outcome
from tests.helpers import install, launch, portal_pins, post_frame, sb, state, visible_to

pytestmark = [pytest.mark.mutation, pytest.mark.django_db]

USER = 2


@pytest.fixture
def opened(sandbox: Any) -> Portal:
    """The app installed on "alpha" and opened once by USER (their tokens stored)."""
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", USER)).status_code == 200
    return Portal.objects.get()


def _want(portal: Portal, flow_ids: list[int], desired: bool = True) -> None:
    intents.set_desired(portal, USER, flow_ids, desired)


def _status(portal: Portal) -> dict[int, tuple[str, str, bool | None]]:
    return {
        i.flow_id: (i.status, i.problem, i.observed)
        for i in PinIntent.objects.filter(portal=portal, user_id=USER)
    }


def _toggles(sandbox: Any) -> int:
    return int(state(sandbox)["counters"]["pin_toggles"])


def _batch(redis_client: Any, portal: Portal) -> dict[bytes, bytes]:
    return dict(redis_client.hgetall(f"fp:batch:{portal.pk}:{USER}"))


@pytest.fixture
def top_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jitter at the top of its range, so a delay can be compared exactly."""
    monkeypatch.setattr(converge.random, "uniform", lambda low, high: high)


# --- a run that settles everything --------------------------------------------------------------


def test_a_run_pins_what_the_user_wants_and_closes_the_intents(
    sandbox: Any, opened: Portal, redis_client: Any
) -> None:
    flows = visible_to(sandbox, USER)[:3]
    _want(opened, flows)
    assert converge.claim_queued(opened.pk, USER)
    redis_client.set(f"fp:failures:{opened.pk}:{USER}", 3)
    redis_client.set(f"fp:unexpected:{opened.pk}:{USER}", 2)
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE and outcome.again is False
    assert outcome.stats == {"rounds": 1, "toggles": 3, "done": 3, "failed": 0, "reads": 0}
    assert portal_pins(sandbox, USER) == set(flows)
    assert _status(opened) == {f: ("done", "", True) for f in flows}
    # The run is over: the marker, the failure counts and the lock are gone.
    for key in ("queued", "failures", "unexpected", "conv"):
        assert not redis_client.exists(f"fp:{key}:{opened.pk}:{USER}"), key
    # Three answered, in a request shorter than the batch may be: nothing learnt, nothing written.
    assert _batch(redis_client, opened) == {}


def test_an_unknown_state_is_toggled_until_the_answer_agrees(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    sb(sandbox, "p/alpha/pins", {"user_id": USER, "flow_ids": flows, "pinned": True})
    _want(opened, flows[:1], True)  # pinned already: the first toggle unpins, the next pins
    _want(opened, flows[1:], False)  # pinned: one toggle unpins
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE
    assert outcome.stats["toggles"] == 3 and outcome.stats["rounds"] == 2
    assert portal_pins(sandbox, USER) == {flows[0]}
    assert _status(opened) == {flows[0]: ("done", "", True), flows[1]: ("done", "", False)}
    assert PinIntent.objects.get(flow_id=flows[0]).toggles == 2


def test_what_already_agrees_is_closed_without_a_call(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    PinIntent.objects.update(observed=True)
    before = _toggles(sandbox)
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE and outcome.stats["done"] == 2
    assert outcome.stats["rounds"] == 0
    assert _toggles(sandbox) == before
    assert _status(opened) == {f: ("done", "", True) for f in flows}


def test_a_flow_that_used_up_its_toggles_is_given_up(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    PinIntent.objects.filter(flow_id=flows[0]).update(observed=False, toggles=converge.MAX_TOGGLES)
    PinIntent.objects.filter(flow_id=flows[1]).update(toggles=converge.MAX_TOGGLES - 1)
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE and outcome.stats["failed"] == 1
    assert _status(opened)[flows[0]] == ("failed", Problem.GAVE_UP, False)
    assert _status(opened)[flows[1]] == ("done", "", True)  # one toggle left was enough


def test_a_full_window_of_settled_intents_does_not_hide_the_rest(
    sandbox: Any, opened: Portal
) -> None:
    real = visible_to(sandbox, USER)[0]
    settled = list(range(50_001, 50_001 + converge.PENDING_WINDOW))
    _want(opened, settled)
    PinIntent.objects.update(observed=True)
    _want(opened, [real])
    PinIntent.objects.filter(flow_id=real).update(updated_at=timezone.now() + timedelta(hours=1))
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE
    assert outcome.stats["done"] == converge.PENDING_WINDOW + 1
    assert portal_pins(sandbox, USER) == {real}


def test_a_run_with_no_user_or_portal_has_nothing_to_do(sandbox: Any, opened: Portal) -> None:
    assert converge.converge_user(opened.pk, 99).kind is Kind.DONE
    assert converge.converge_user(opened.pk + 1000, USER).kind is Kind.DONE


def test_a_run_converges_a_bounded_number_of_rounds(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:4]
    _want(opened, flows)
    batch = toggles.BatchSize(opened.pk, USER)  # one toggle, then two: three in two rounds
    batch.size, batch.slow_start, batch._dirty = 1, False, True
    batch.save()
    outcome = converge.converge_user(opened.pk, USER, max_rounds=2)
    assert (outcome.kind, outcome.delay, outcome.reason) == (
        Kind.RETRY,
        0.0,
        "more pins than one run converges",
    )
    assert outcome.exact and outcome.progress
    assert len(portal_pins(sandbox, USER)) == 3
    # Answers are closed at the start of the next round: the last round's wait for the next run.
    assert sorted(map(str, _status(opened).values())) == [
        "('done', '', True)",
        "('pending', '', None)",
        "('pending', '', True)",
        "('pending', '', True)",
    ]


# --- the user's lock ------------------------------------------------------------------------------


def test_a_run_finding_the_lock_held_comes_back_shortly(
    sandbox: Any, opened: Portal, redis_client: Any
) -> None:
    _want(opened, visible_to(sandbox, USER)[:1])
    with UserLock(opened.pk, USER, "other-node"):
        outcome = converge.converge_user(opened.pk, USER)
    assert (outcome.kind, outcome.reason, outcome.exact) == (Kind.RETRY, converge.BUSY, True)
    assert 0.2 <= outcome.delay <= 0.6
    assert portal_pins(sandbox, USER) == set()


def test_a_run_that_loses_its_lock_stops_and_leaves_the_marker(
    sandbox: Any, opened: Portal, redis_client: Any
) -> None:
    _want(opened, visible_to(sandbox, USER)[:1])
    outcome = converge.converge_user(opened.pk, USER, lock_ttl_ms=1)
    assert (outcome.kind, outcome.reason) == (Kind.FINAL, converge.LOCK_LOST)
    assert _status(opened) == {visible_to(sandbox, USER)[0]: ("pending", "", None)}
    assert converge.claim_queued(opened.pk, USER)
    again = converge._next(opened.pk, USER, outcome)
    assert again == outcome and redis_client.exists(converge.queued_key(opened.pk, USER))


# --- between runs ---------------------------------------------------------------------------


def test_one_run_per_user_is_queued(sandbox: Any, redis_client: Any) -> None:
    assert converge.queued_key(7, 9) == "fp:queued:7:9"
    assert converge.claim_queued(7, 9) is True
    assert converge.claim_queued(7, 9) is False
    assert redis_client.ttl("fp:queued:7:9") == converge.QUEUED_TTL
    assert converge.claim_queued(7, 8) is True
    converge.release_queued(7, 9)
    assert converge.claim_queued(7, 9) is True


def test_a_finished_run_says_whether_work_is_left(sandbox: Any, opened: Portal) -> None:
    assert converge.claim_queued(opened.pk, USER)
    assert converge.finish_run(opened.pk, USER) is False
    assert converge.claim_queued(opened.pk, USER)  # the marker was dropped
    _want(opened, visible_to(sandbox, USER)[:1])
    assert converge.finish_run(opened.pk, USER) is True


def test_failures_are_counted_per_kind_for_an_hour(sandbox: Any, redis_client: Any) -> None:
    assert converge.count_failure(1, 2) == 1
    assert converge.count_failure(1, 2) == 2
    assert converge.count_failure(1, 2, converge.UNEXPECTED) == 1
    assert redis_client.get("fp:failures:1:2") == b"2"
    assert redis_client.ttl("fp:failures:1:2") == 3600
    assert redis_client.ttl("fp:unexpected:1:2") == 3600


@pytest.mark.parametrize(
    ("failures", "at_least", "wait"),
    [(1, 0.0, 0.5), (2, 0.0, 1.0), (4, 0.0, 4.0), (8, 0.0, 60.0), (50, 0.0, 60.0), (1, 3.0, 3.0)]
    + [(7, 0.0, 32.0), (1, 90.0, 90.0)],
)
def test_the_backoff_doubles_up_to_a_minute_with_half_again_of_jitter(
    top_of_range: None, failures: int, at_least: float, wait: float
) -> None:
    assert converge.backoff(failures, at_least) == wait * 1.5


def test_the_backoff_jitter_is_never_below_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(converge.random, "uniform", lambda low, high: low)
    assert converge.backoff(3) == 2.0
    assert converge.backoff(1) == 0.5  # no floor unless one is given


def test_a_retry_keeps_the_marker_through_its_wait(sandbox: Any, redis_client: Any) -> None:
    assert converge.claim_queued(3, 4)
    outcome = converge._retry_in(3, 4, 30.7, "why")
    assert outcome == Outcome.retry(30.7, "why", exact=True)
    assert redis_client.ttl("fp:queued:3:4") == converge.QUEUED_TTL + 31


def test_a_retry_after_progress_forgets_the_outage_before_it(
    sandbox: Any, redis_client: Any, top_of_range: None
) -> None:
    redis_client.set("fp:failures:5:6", 3)
    exact = converge._next(5, 6, Outcome.retry(2.0, "rate limited", exact=True, progress=True))
    assert (exact.kind, exact.reason, exact.exact) == (Kind.RETRY, "rate limited", True)
    assert exact.delay == pytest.approx(2.05)
    assert not redis_client.exists("fp:failures:5:6")
    negative = converge._next(5, 6, Outcome.retry(-3.0, "late", exact=True))
    assert negative.delay == pytest.approx(0.05)
    # The marker outlives the wait.
    assert converge.claim_queued(5, 6)
    converge._next(5, 6, Outcome.retry(30.0, "rate limited", exact=True))
    assert redis_client.ttl("fp:queued:5:6") == converge.QUEUED_TTL + 31
    # An outage backs off on the count of failures in a row, at least its own delay.
    redis_client.set("fp:failures:5:6", 2)
    outage = converge._next(5, 6, Outcome.retry(2.0, "portal unavailable"))
    assert outage.delay == pytest.approx(2.0 * 1.5)  # third failure: 2 s, and its jitter
    assert redis_client.get("fp:failures:5:6") == b"3"
    outage = converge._next(5, 6, Outcome.retry(9.0, "portal unavailable"))
    assert outage.delay == pytest.approx(9.0 * 1.5)


def test_an_exact_retry_adds_at_most_a_hair(sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(converge.random, "uniform", lambda low, high: low)
    assert converge._next(5, 7, Outcome.retry(2.0, "rate limited", exact=True)).delay == 2.0


def test_a_click_landing_before_the_verdict_keeps_its_intent(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:1]
    _want(opened, flows)
    PinIntent.objects.update(observed=True)
    pending = list(PinIntent.objects.all())  # read by the run: it agrees
    _want(opened, flows, False)  # the user clicks again before the run closes it
    stats = {"done": 0, "failed": 0}
    converge._settle_agreed(pending, stats)
    assert _status(opened) == {flows[0]: ("pending", "", True)}  # not closed as done


def test_a_final_outcome_ends_the_run(sandbox: Any, opened: Portal, redis_client: Any) -> None:
    assert converge.claim_queued(opened.pk, USER)
    redis_client.set(f"fp:failures:{opened.pk}:{USER}", 3)
    final = converge._next(opened.pk, USER, Outcome.final(Problem.REOPEN))
    assert (final.kind, final.reason, final.again) == (Kind.FINAL, Problem.REOPEN, False)
    assert not redis_client.exists(converge.queued_key(opened.pk, USER))
    assert redis_client.exists(f"fp:failures:{opened.pk}:{USER}")  # only success clears it
    _want(opened, visible_to(sandbox, USER)[:1])
    assert converge._next(opened.pk, USER, Outcome.final(Problem.REOPEN)).again is True


def test_unexpected_failures_back_off_then_give_up(
    sandbox: Any, opened: Portal, redis_client: Any, top_of_range: None
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    assert converge.claim_queued(opened.pk, USER)
    for failures in range(1, converge.MAX_UNEXPECTED_FAILURES):
        outcome = converge.unexpected_failure(opened.pk, USER)
        assert (outcome.kind, outcome.reason) == (Kind.RETRY, "unexpected failure")
        assert outcome.delay == converge.backoff(failures, 1.0)
        # The marker outlives the wait: no click queues a second run meanwhile.
        ttl = redis_client.ttl(converge.queued_key(opened.pk, USER))
        assert ttl == converge.QUEUED_TTL + int(outcome.delay) + 1
    outcome = converge.unexpected_failure(opened.pk, USER)
    assert (outcome.kind, outcome.reason) == (
        Kind.FINAL,
        "gave up after 5 unexpected failures (2 pins marked failed)",
    )
    assert outcome.again is False
    assert _status(opened) == {f: ("failed", Problem.INTERNAL, None) for f in flows}
    assert not redis_client.exists(f"fp:unexpected:{opened.pk}:{USER}")
    assert not redis_client.exists(converge.queued_key(opened.pk, USER))


def test_a_run_that_fails_unexpectedly_is_retried_not_lost(
    sandbox: Any, opened: Portal, settings: Any, redis_client: Any, top_of_range: None
) -> None:
    _want(opened, visible_to(sandbox, USER)[:1])
    # A stored token this process cannot decrypt: not an outage, a fault of ours.
    settings.B24_TOKEN_KEY = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMzI="
    outcome = converge.run(opened.pk, USER)
    assert (outcome.kind, outcome.reason) == (Kind.RETRY, "unexpected failure")
    assert outcome.delay == 1.5
    assert redis_client.get(f"fp:unexpected:{opened.pk}:{USER}") == b"1"
    assert not redis_client.exists(f"fp:failures:{opened.pk}:{USER}")


def test_a_run_while_redis_is_down_backs_off_like_an_outage(
    sandbox: Any, opened: Portal, monkeypatch: pytest.MonkeyPatch, top_of_range: None
) -> None:
    flows = visible_to(sandbox, USER)[:1]
    _want(opened, flows)
    # The app's own client, pointed where nothing listens: Redis is down for this process.
    down = redis_lib.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    monkeypatch.setattr(redisconn, "_client", down)
    outcome = converge.run(opened.pk, USER)
    assert (outcome.kind, outcome.reason, outcome.exact) == (Kind.RETRY, "ConnectionError", True)
    # Redis cannot count the failures: taken as the fourth in a row (4 s, and its jitter).
    assert outcome.delay == 4.0 * 1.5
    monkeypatch.undo()
    assert _status(opened) == {flows[0]: ("pending", "", None)}
    assert portal_pins(sandbox, USER) == set()


# --- rounds that do not simply answer --------------------------------------------------------


def test_a_lost_answer_leaves_the_state_unknown_and_the_flow_alone(
    sandbox: Any, opened: Portal, redis_client: Any
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    sb(sandbox, "config", {"portal": "alpha", "pin_drop_ratio": 1.0})
    before = timezone.now()
    outcome = converge.converge_user(opened.pk, USER)
    assert (outcome.kind, outcome.reason, outcome.exact) == (
        Kind.RETRY,
        "waiting out a lost answer",
        True,
    )
    assert outcome.progress is False
    assert 0.5 < outcome.delay <= 1.0  # the quiet period of a closed connection
    for intent in PinIntent.objects.all():
        assert (intent.observed, intent.toggles, intent.problem) == (None, 0, Problem.UNAVAILABLE)
        assert before + timedelta(seconds=1) <= intent.not_before
        assert intent.not_before <= timezone.now() + timedelta(seconds=1)
    # The path lost a request of two: the next carries one, and no longer doubles.
    assert _batch(redis_client, opened) == {b"size": b"1", b"slow": b"0", b"lost": b"1"}
    assert redis_client.ttl(f"fp:batch:{opened.pk}:{USER}") == toggles.BatchSize.TTL


@pytest.mark.parametrize(("lost_before", "pause"), [(11, 1.0), (12, 2.0), (13, 4.0), (30, 5.0)])
def test_answers_lost_again_and_again_pause_the_run(
    sandbox: Any, opened: Portal, redis_client: Any, lost_before: int, pause: float
) -> None:
    _want(opened, visible_to(sandbox, USER)[:1])
    redis_client.hset(
        f"fp:batch:{opened.pk}:{USER}", mapping={"size": 1, "slow": 0, "lost": lost_before}
    )
    sb(sandbox, "config", {"portal": "alpha", "pin_drop_ratio": 1.0})
    outcome = converge.converge_user(opened.pk, USER)
    assert (outcome.kind, outcome.reason, outcome.exact) == (
        Kind.RETRY,
        "answers keep being lost",
        True,
    )
    assert outcome.delay == pause


def test_a_flow_waiting_out_a_lost_answer_does_not_hold_up_the_others(
    sandbox: Any, opened: Portal
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    later = timezone.now() + timedelta(seconds=30)
    PinIntent.objects.filter(flow_id=flows[0]).update(not_before=later)
    outcome = converge.converge_user(opened.pk, USER)
    assert outcome.kind is Kind.RETRY and outcome.reason == "waiting out a lost answer"
    assert outcome.progress is True  # the other flow was answered in this run
    assert 28 < outcome.delay <= 30
    assert portal_pins(sandbox, USER) == {flows[1]}
    # Once its quiet period is over it goes too.
    PinIntent.objects.filter(flow_id=flows[0]).update(not_before=timezone.now())
    assert converge.converge_user(opened.pk, USER).kind is Kind.DONE
    assert portal_pins(sandbox, USER) == set(flows)


def test_a_flow_the_user_cannot_see_fails_alone(sandbox: Any, opened: Portal) -> None:
    seen = visible_to(sandbox, USER)[:2]
    hidden = sorted({f["id"] for f in state(sandbox)["flows"]} - set(visible_to(sandbox, USER)))
    _want(opened, seen + hidden[:1])
    PinIntent.objects.filter(flow_id=seen[1]).update(observed=False, toggles=converge.MAX_TOGGLES)
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE and outcome.stats["failed"] == 2  # one given up, one denied
    assert _status(opened) == {
        seen[0]: ("done", "", True),
        seen[1]: ("failed", Problem.GAVE_UP, False),
        hidden[0]: ("failed", Problem.DENIED, None),
    }
    _want(opened, hidden[:1])  # alone, in a request of its own
    assert converge.run(opened.pk, USER).stats["failed"] == 1
    assert _status(opened)[hidden[0]] == ("failed", Problem.DENIED, None)


def test_answers_that_say_nothing_end_in_could_not_confirm(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    sb(sandbox, "config", {"portal": "alpha", "malformed_answers": True})
    outcome = converge.run(opened.pk, USER)
    assert outcome.kind is Kind.DONE and outcome.stats["failed"] == 2
    assert outcome.stats["toggles"] == 0
    for intent in PinIntent.objects.all():
        assert (intent.status, intent.problem) == ("failed", Problem.GAVE_UP)
        assert intent.toggles == converge.MAX_TOGGLES


def test_a_user_who_must_reopen_stops_every_pending_pin(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:3]
    _want(opened, flows)
    PortalUser.objects.filter(user_id=USER).update(refresh_token="x" * 32, expires_at=None)
    outcome = converge.run(opened.pk, USER)
    assert (outcome.kind, outcome.reason) == (Kind.FINAL, Problem.REOPEN)
    assert outcome.stats == {} and outcome.again is False
    assert _status(opened) == {f: ("failed", Problem.REOPEN, None) for f in flows}


def test_a_portal_that_is_gone_stops_every_pending_pin(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    sb(sandbox, "config", {"portal": "alpha", "portal_deleted": True})
    outcome = converge.run(opened.pk, USER)
    assert (outcome.kind, outcome.reason) == (Kind.FINAL, Problem.REINSTALL)
    assert _status(opened) == {f: ("failed", Problem.REINSTALL, None) for f in flows}
    portal = Portal.objects.get()
    assert (portal.state, portal.state_reason) == (
        Portal.State.NEEDS_REINSTALL,
        "the portal refused the app",
    )


def test_an_uninstalled_portal_stops_every_pending_pin(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    Portal.objects.update(state=Portal.State.NEEDS_REINSTALL, state_reason="unpaid")
    outcome = converge.converge_user(opened.pk, USER)
    assert (outcome.kind, outcome.reason) == (Kind.FINAL, Problem.REINSTALL)
    assert _status(opened) == {f: ("failed", Problem.REINSTALL, None) for f in flows}
    assert Portal.objects.get().state_reason == "unpaid"


def test_a_portal_that_does_not_answer_is_tried_again(
    sandbox: Any, opened: Portal, redis_client: Any
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    PinIntent.objects.update(toggles=2)
    sb(sandbox, "config", {"portal": "alpha", "error_5xx_ratio": 1.0})
    waiting = visible_to(sandbox, USER)[5]
    _want(opened, [waiting])
    PinIntent.objects.filter(flow_id=waiting).update(not_before=timezone.now() + timedelta(hours=1))
    before = timezone.now()
    outcome = converge.converge_user(opened.pk, USER)
    assert (outcome.kind, outcome.reason, outcome.delay) == (Kind.RETRY, "portal unavailable", 2.0)
    assert not outcome.exact and not outcome.progress
    assert _status(opened) == {
        **{f: ("pending", Problem.UNAVAILABLE, None) for f in flows},
        waiting: ("pending", "", None),  # not in the request: not marked
    }
    assert set(PinIntent.objects.values_list("toggles", flat=True)) == {2, 0}
    for intent in PinIntent.objects.filter(flow_id__in=flows):
        assert intent.updated_at >= before  # the problem is news: the page is told
    # After an answered toggle in the same run, the failure says the portal answered before.
    user = PortalUser.objects.get(user_id=USER)
    chunk = {i.flow_id: i for i in PinIntent.objects.filter(flow_id__in=flows)}
    with UserLock(opened.pk, USER) as lock:
        answered = toggles.toggle_round(opened, user, chunk, {"toggles": 1, "failed": 0}, lock)
    assert answered == Outcome.retry(2.0, "portal unavailable", progress=True)


def test_a_portal_out_of_operating_time_is_left_until_it_resets(
    sandbox: Any, opened: Portal
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    sb(sandbox, "config", {"portal": "alpha", "operating_cost": 500, "operating_limit": 1})
    _want(opened, flows[:1])
    assert converge.converge_user(opened.pk, USER).kind is Kind.DONE  # that used the time up
    _want(opened, flows[1:])
    outcome = converge.converge_user(opened.pk, USER)
    assert (outcome.kind, outcome.reason, outcome.exact) == (
        Kind.RETRY,
        "operating time limit",
        True,
    )
    assert outcome.delay >= 1.0 and outcome.progress is False
    assert _status(opened)[flows[1]] == ("pending", Problem.RATE_LIMITED, None)


def test_commands_a_batch_refuses_one_by_one_fail_alone(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    sb(sandbox, "config", {"portal": "alpha", "scope": "placement"})
    PortalUser.objects.filter(user_id=USER).update(expires_at=None)  # new tokens: no task scope
    outcome = converge.converge_user(opened.pk, USER)
    assert outcome.kind is Kind.DONE and outcome.stats["failed"] == 2
    assert _status(opened) == {f: ("failed", Problem.DENIED, None) for f in flows}
    assert portal_pins(sandbox, USER) == set()


def test_commands_refused_for_a_while_are_tried_again(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:3]
    sb(sandbox, "config", {"portal": "alpha", "operating_cost": 500, "operating_limit": 1})
    _want(opened, flows[:1])
    assert converge.converge_user(opened.pk, USER).kind is Kind.DONE  # that used the time up
    _want(opened, flows[1:])  # a batch of two: each command refused for the operating time
    outcome = converge.converge_user(opened.pk, USER)
    assert outcome == Outcome.retry(2.0, "sub-commands failed", progress=False)
    assert _status(opened)[flows[1]] == ("pending", "", None)
    assert _status(opened)[flows[2]] == ("pending", "", None)
    assert set(
        PinIntent.objects.filter(flow_id__in=flows[1:]).values_list("toggles", flat=True)
    ) == {0}
    user = PortalUser.objects.get(user_id=USER)
    chunk = {i.flow_id: i for i in PinIntent.objects.filter(flow_id__in=flows[1:])}
    with UserLock(opened.pk, USER) as lock:
        answered = toggles.toggle_round(opened, user, chunk, {"toggles": 2, "failed": 0}, lock)
    # Now the whole request is refused, until the operating time resets.
    assert isinstance(answered, Outcome)
    assert (answered.reason, answered.exact, answered.progress) == (
        "operating time limit",
        True,
        True,
    )


def test_a_request_refused_whole_gives_its_pins_up(sandbox: Any, opened: Portal) -> None:
    flows = visible_to(sandbox, USER)[:3]
    _want(opened, flows)
    user = PortalUser.objects.get(user_id=USER)
    chunk = {i.flow_id: i for i in PinIntent.objects.filter(flow_id__in=flows[:2])}
    stats = {"toggles": 0, "failed": 1}
    refused = BadRequest("0", "Unknown error")
    assert (
        toggles._request_failed(opened, user, chunk, stats, refused, progress=False) == "answered"
    )
    assert stats["failed"] == 3
    assert _status(opened) == {
        flows[0]: ("failed", Problem.GAVE_UP, None),
        flows[1]: ("failed", Problem.GAVE_UP, None),
        flows[2]: ("pending", "", None),
    }


# --- the pieces of a round ---------------------------------------------------------------------


def test_the_batch_grows_fast_then_slowly_and_halves_on_a_loss(
    sandbox: Any, redis_client: Any
) -> None:
    batch = toggles.BatchSize(1, 2)
    assert (batch.size, batch.slow_start, batch.lost_in_a_row) == (10, True, 0)
    batch.answered(3)  # a short request grows nothing
    assert batch.size == 10
    batch.save()
    assert not redis_client.exists("fp:batch:1:2")  # nothing changed: nothing written
    batch.answered(10)
    assert batch.size == 20
    batch.answered(20)
    batch.answered(40)
    assert batch.size == 50  # capped at a batch's 50 commands
    batch.lost(50)
    assert (batch.size, batch.slow_start, batch.lost_in_a_row) == (25, False, 1)
    batch.lost(25)
    assert (batch.size, batch.lost_in_a_row) == (12, 2)  # whole commands
    batch.lost(4)  # a loss of a small request halves what was sent
    assert (batch.size, batch.lost_in_a_row) == (2, 3)
    batch.lost(1)
    assert batch.size == 1
    batch.answered(1)
    assert (batch.size, batch.lost_in_a_row) == (2, 0)  # one more, no longer doubled
    batch.save()
    again = toggles.BatchSize(1, 2)
    assert (again.size, again.slow_start, again.lost_in_a_row) == (2, False, 0)
    assert redis_client.ttl("fp:batch:1:2") == 600


def test_growth_is_written_even_if_a_short_request_follows(sandbox: Any, redis_client: Any) -> None:
    batch = toggles.BatchSize(1, 4)
    batch.answered(10)
    batch.answered(3)  # short: no change, but the growth before it stays to be written
    batch.save()
    assert redis_client.hget("fp:batch:1:4", "size") == b"20"


def test_after_a_loss_the_batch_grows_by_one(sandbox: Any, redis_client: Any) -> None:
    redis_client.hset("fp:batch:1:5", mapping={"size": 12, "slow": 0, "lost": 3})
    batch = toggles.BatchSize(1, 5)
    batch.answered(12)
    assert (batch.size, batch.lost_in_a_row) == (13, 0)


def test_a_loss_at_the_same_size_is_still_written(sandbox: Any, redis_client: Any) -> None:
    redis_client.hset("fp:batch:1:3", mapping={"size": 1, "slow": 0, "lost": 0})
    batch = toggles.BatchSize(1, 3)
    batch.lost(1)
    batch.save()
    assert redis_client.hget("fp:batch:1:3", "lost") == b"1"
    batch.save()  # written once: a second save writes nothing
    redis_client.delete("fp:batch:1:3")
    batch.save()
    assert not redis_client.exists("fp:batch:1:3")


def test_limits_name_when_the_request_may_go_again(monkeypatch: pytest.MonkeyPatch) -> None:
    limited = toggles.limit_wait(RateLimited(retry_after=3.5), progress=True)
    assert limited == Outcome.retry(3.5, "rate limited", exact=True, progress=True)
    monkeypatch.setattr(toggles.time, "time", lambda: 1000.0)
    paused = toggles.limit_wait(OperationTimeLimit(reset_at=1042.0), progress=False)
    assert paused == Outcome.retry(42.0, "operating time limit", exact=True, progress=False)
    paused = toggles.limit_wait(OperationTimeLimit(reset_at=1042.0), progress=True)
    assert paused == Outcome.retry(42.0, "operating time limit", exact=True, progress=True)
    soon = toggles.limit_wait(OperationTimeLimit(reset_at=1000.5), progress=False)
    assert soon is not None and soon.delay == 1.0
    assert toggles.limit_wait(Unavailable("INTERNAL_SERVER_ERROR"), progress=False) is None


def test_a_read_timeout_waits_until_the_portal_must_be_done(settings: Any) -> None:
    settings.B24_PORTAL_REQUEST_SECONDS = 60.0
    settings.B24_HTTP_TIMEOUT = (3.0, 20.0)
    assert toggles.quiet_period(ResponseLost("READ_TIMEOUT")) == 41.0
    assert toggles.quiet_period(ResponseLost("CONNECTION_CLOSED")) == 1.0
    settings.B24_PORTAL_REQUEST_SECONDS = 10.0
    assert toggles.quiet_period(ResponseLost("READ_TIMEOUT")) == 1.0


def test_answers_are_recorded_by_flow_and_a_click_in_between_is_kept(
    sandbox: Any, opened: Portal
) -> None:
    _want(opened, [1, 2, 3, 4])
    pending = {i.flow_id: i for i in PinIntent.objects.all()}
    PinIntent.objects.filter(flow_id=4).update(status=PinIntent.Status.DONE)
    PinIntent.objects.update(toggles=2)
    later = timezone.now() + timedelta(seconds=5)
    before = timezone.now()
    toggles.record_answers({1: True, 2: False}, pending)
    assert PinIntent.objects.get(flow_id=1).updated_at >= before
    toggles.record_answers({3: None, 4: None}, pending, only_pending=True, not_before=later)
    toggles.record_answers({2: None}, pending, count=True)
    rows = {i.flow_id: i for i in PinIntent.objects.all()}
    assert (rows[1].observed, rows[1].toggles, rows[1].desired) == (True, 3, True)
    assert (rows[2].observed, rows[2].toggles) == (None, 4)
    assert (rows[3].observed, rows[3].toggles, rows[3].not_before) == (None, 0, later)
    assert (rows[4].toggles, rows[4].not_before) == (2, None)  # not pending: not touched
    assert rows[1].observed_at is not None and rows[4].observed_at is None
    toggles.record_answers({4: True}, pending)  # what Bitrix24 said is kept, settled or not
    assert PinIntent.objects.get(flow_id=4).observed is True


def test_finishing_rechecks_what_the_verdict_rests_on(sandbox: Any, opened: Portal) -> None:
    _want(opened, [1, 2])
    pks = list(PinIntent.objects.values_list("pk", flat=True))
    PinIntent.objects.filter(flow_id=2).update(toggles=1)
    toggles.finish(pks, PinIntent.Status.FAILED, Problem.GAVE_UP, toggles__gte=1)
    assert _status(opened) == {1: ("pending", "", None), 2: ("failed", Problem.GAVE_UP, None)}
    toggles.finish([], PinIntent.Status.DONE, "")
    toggles.finish(pks, PinIntent.Status.DONE, "")
    assert _status(opened) == {1: ("done", "", None), 2: ("failed", Problem.GAVE_UP, None)}


def test_an_answer_lost_to_a_lost_lock_claims_nothing(
    sandbox: Any, opened: Portal, redis_client: Any
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    _want(opened, flows)
    PinIntent.objects.update(observed=False, toggles=3)
    user = PortalUser.objects.get(user_id=USER)
    chunk = {i.flow_id: i for i in PinIntent.objects.all()}
    from flows.lock import LockLost

    with UserLock(opened.pk, USER, ttl_ms=60_000) as lock:
        redis_client.delete(f"fp:conv:{opened.pk}:{USER}")
        lock._lost.set()
        with pytest.raises(LockLost):
            toggles.toggle_round(opened, user, chunk, {"toggles": 0, "failed": 0}, lock)
    assert set(PinIntent.objects.values_list("observed", "toggles")) == {(None, 0)}
    assert json.dumps(sorted(portal_pins(sandbox, USER))) == json.dumps(sorted(flows))
