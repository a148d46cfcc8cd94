"""Abuse, slow portals and one noisy user: fenced convergence, bounded work, deadlines, fair
shares of a portal's budget, per-user limits, no hot loops."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client
from django.utils import timezone

from b24app.bitrix.client import PortalClient
from b24app.bitrix.errors import RateLimited, ResponseLost
from b24app.bitrix.ratelimit import INTERACTIVE_RESERVE, PortalRateLimiter
from b24app.problems import Problem
from b24app.redisconn import redis_client
from b24app.tasks import bind_handlers
from flows import converge, intents, tasks
from flows.models import PinIntent
from flows.outcome import Kind, Outcome
from tests.flows.conftest import USER
from tests.helpers import (
    api,
    install,
    launch,
    open_app,
    portal_pins,
    post_frame,
    sb,
    state,
    visible_to,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tasks sent to the broker during the test (they are still sent)."""
    sent: list[str] = []
    for task in (tasks.refresh_snapshot, tasks.add_flow, bind_handlers):
        original = task.apply_async

        def spy(*args: Any, _original: Any = original, _name: str = task.name, **kw: Any) -> Any:
            sent.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(task, "apply_async", spy)
    return sent


# --- fenced convergence -----------------------------------------------------------------------


def _name(outcome: Outcome) -> Any:
    """A run's end as the tests below compare it: its stats, or why it stopped."""
    if outcome.reason == converge.BUSY:
        return "Busy"
    if outcome.reason == converge.LOCK_LOST:
        return "LockLost"
    return outcome.stats if outcome.kind is Kind.DONE else f"{outcome.kind.value}: {outcome}"


def _converge_in_thread(portal_id: int, results: list[Any], ttl_ms: int) -> threading.Thread:
    def run() -> None:
        try:
            outcome = converge.converge_user(portal_id, USER, lock_ttl_ms=ttl_ms)
            results.append(_name(outcome))
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_round_slower_than_the_lock_ttl_keeps_the_lock_and_toggles_once(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    portal = opened["portal"]
    flows = visible_to(sandbox, USER)[:3]
    intents.set_desired(portal, USER, flows, True)
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 1500})  # a round: 1.5 s; TTL: 0.6 s
    results: list[Any] = []
    first = _converge_in_thread(portal.pk, results, ttl_ms=600)
    time.sleep(0.9)  # the TTL has passed more than once: only the heartbeat holds the lock
    second = _converge_in_thread(portal.pk, results, ttl_ms=600)
    first.join(20)
    second.join(20)
    assert "Busy" in results  # the second run found the lock held
    toggles = [e for e in state(sandbox)["pin_log"] if e["user_id"] == USER]
    assert sorted(e["flow_id"] for e in toggles) == sorted(flows)  # one toggle per flow
    assert portal_pins(sandbox, USER) == set(flows)
    assert set(PinIntent.objects.values_list("status", "observed")) == {("done", True)}


def test_a_run_that_loses_its_lock_claims_nothing(sandbox: Any, opened: dict[str, Any]) -> None:
    portal = opened["portal"]
    flows = visible_to(sandbox, USER)[:2]
    intents.set_desired(portal, USER, flows, True)
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 1200})
    results: list[Any] = []
    run = _converge_in_thread(portal.pk, results, ttl_ms=600)
    time.sleep(0.5)
    redis_client().set(f"fp:conv:{portal.pk}:{USER}", "another-run", px=5000)  # taken over
    run.join(20)
    assert results == ["LockLost"]
    # The toggles went out, but this run may no longer speak for them: state unknown, pending.
    assert set(PinIntent.objects.values_list("status", "observed")) == {("pending", None)}


# --- no hot loops -----------------------------------------------------------------------------


@pytest.mark.services
def test_an_undecryptable_token_backs_off_then_fails_the_pins_with_words(
    sandbox: Any, live_server: Any, opened: dict[str, Any], celery_worker_process: Any
) -> None:
    flow = visible_to(sandbox, USER)[0]
    with connection.cursor() as cursor:  # stored under a key the app no longer has
        cursor.execute(
            "UPDATE b24app_portaluser SET access_token = %s WHERE user_id = %s",
            ["gAAAAABnot-a-token-any-key-can-read", USER],
        )
    started = time.monotonic()
    answer = api(
        opened["client"],
        opened["token"],
        "POST",
        "/flows/api/pin",
        {"flow_ids": [flow], "pinned": True},
    )
    assert answer.status_code == 202
    deadline = time.monotonic() + 40
    intent = PinIntent.objects.get()
    while intent.status == PinIntent.Status.PENDING and time.monotonic() < deadline:
        time.sleep(0.3)
        intent.refresh_from_db()
    elapsed = time.monotonic() - started
    assert intent.status == PinIntent.Status.FAILED
    assert intent.problem == Problem.INTERNAL
    assert elapsed > 4  # five runs with growing backoff between them, not a spin
    status = api(opened["client"], opened["token"], "GET", f"/flows/api/status?ids={flow}")
    assert "try again later" in status.json()["intents"][0]["message"]
    assert portal_pins(sandbox, USER) == set()  # nothing was sent


@pytest.mark.services
def test_unreadable_pin_answers_end_in_words_after_a_bounded_number_of_calls(
    sandbox: Any, live_server: Any, opened: dict[str, Any], celery_worker_process: Any
) -> None:
    flows = visible_to(sandbox, USER)[:2]
    sb(sandbox, "config", {"portal": "alpha", "malformed_answers": True})
    calls_before = state(sandbox)["counters"]["pin_toggles"]
    answer = api(
        opened["client"],
        opened["token"],
        "POST",
        "/flows/api/pin",
        {"flow_ids": flows, "pinned": True},
    )
    assert answer.status_code == 202
    deadline = time.monotonic() + 30
    while PinIntent.objects.filter(status="pending").exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert set(PinIntent.objects.values_list("status", "problem")) == {("failed", "gave_up")}
    toggles = state(sandbox)["counters"]["pin_toggles"] - calls_before
    assert toggles == len(flows) * converge.MAX_TOGGLES  # bounded: then it says so and stops


# --- bounded work -------------------------------------------------------------------------------


def test_pins_are_accepted_only_for_flows_the_portal_has(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    known = visible_to(sandbox, USER)[0]
    answer = api(
        opened["client"],
        opened["token"],
        "POST",
        "/flows/api/pin",
        {"flow_ids": [known, 987654], "pinned": True},
    )
    assert answer.status_code == 400
    assert "not known on your portal: 987654" in answer.json()["error"]
    assert PinIntent.objects.count() == 0


def test_pending_pins_per_user_are_capped(
    sandbox: Any, opened: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intents, "MAX_PENDING_PER_USER", 3)
    flows = visible_to(sandbox, USER)[:5]
    first = api(
        opened["client"],
        opened["token"],
        "POST",
        "/flows/api/pin",
        {"flow_ids": flows[:3], "pinned": True},
    )
    assert first.status_code == 202
    more = api(
        opened["client"],
        opened["token"],
        "POST",
        "/flows/api/pin",
        {"flow_ids": flows[3:], "pinned": True},  # a bulk request past the cap
    )
    assert more.status_code == 429
    assert "still waiting" in more.json()["error"]
    assert PinIntent.objects.count() == 3


def test_settled_intents_are_pruned_after_the_retention_but_a_known_state_is_remembered(
    opened: dict[str, Any],
) -> None:
    portal = opened["portal"]
    old = timezone.now() - timedelta(days=django_settings.FLOWPINS_INTENT_DAYS + 1)
    rows = {
        1: ("done", True, old),  # a pin: what the page knows of it, kept
        2: ("done", False, old),  # known unpinned (a read or a click said so): kept
        3: ("failed", None, old),
        6: ("done", None, old),  # settled without a known state: nothing to remember
        4: ("pending", None, old),  # still to do: never pruned
        5: ("done", False, timezone.now()),  # recent
    }
    for flow_id, (status, observed, when) in rows.items():
        PinIntent.objects.create(
            portal=portal,
            user_id=USER,
            flow_id=flow_id,
            desired=True,
            status=status,
            observed=observed,
        )
        PinIntent.objects.filter(flow_id=flow_id).update(updated_at=when)
    assert intents.prune_settled() == 2
    assert sorted(PinIntent.objects.values_list("flow_id", flat=True)) == [1, 2, 4, 5]


def test_a_dozen_page_opens_queue_one_list_refresh(
    sandbox: Any, opened: dict[str, Any], enqueued: list[str]
) -> None:
    for key in (
        f"fp:snap:{opened['portal'].pk}:{USER}",
        f"fp:snapmeta:{opened['portal'].pk}:{USER}",
    ):
        snap = json.loads(redis_client().get(key))
        snap["fetched_at"] -= 3600  # stale (the list and its meta): every open would like a refresh
        redis_client().set(key, json.dumps(snap))
    for _ in range(12):
        assert post_frame(opened["client"], launch(sandbox, "alpha", USER)).status_code == 200
    assert enqueued.count("flows.refresh_snapshot") == 1


def test_a_burst_of_update_events_binds_the_handlers_once(
    sandbox: Any, opened: dict[str, Any], enqueued: list[str]
) -> None:
    opener = launch(sandbox, "alpha", USER)
    for _ in range(5):
        payload = {
            "event": "ONAPPUPDATE",
            "auth[member_id]": opener["form"]["member_id"],
            "auth[application_token]": opener["form"]["APPLICATION_TOKEN"],
        }
        response = Client().post(
            "/b24/events/",
            data=urlencode(payload),
            content_type="application/x-www-form-urlencoded",
        )
        assert response.status_code == 200
    assert enqueued.count("b24app.bind_handlers") == 1


# --- deadlines ----------------------------------------------------------------------------------


def test_a_cold_page_on_a_slow_portal_renders_at_once_with_a_loading_state(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 10_000})
    started = time.monotonic()
    response = post_frame(client, launch(sandbox, "alpha", USER, lang="en"))
    assert time.monotonic() - started < 2.0
    assert response.status_code == 200
    body = response.content.decode()
    assert 'data-loading="1"' in body and "Loading your flows from Bitrix24" in body
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 0})
    # What the page's script asks next: the rows, once a worker has fetched them.
    token = open_app(client, sandbox, USER)
    assert api(client, token, "GET", "/flows/api/rows").json()["loading"] is False


def test_adding_a_flow_on_a_slow_portal_answers_within_the_deadline(
    sandbox: Any, opened: dict[str, Any], settings: Any, enqueued: list[str]
) -> None:
    settings.B24_WEB_TIMEOUT = (1.0, 1.0)
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 4000})
    started = time.monotonic()
    answer = api(opened["client"], opened["token"], "POST", "/flows/api/add", {"flow": "101"})
    assert time.monotonic() - started < 3.0
    assert answer.status_code == 202
    assert "still checking" in answer.json()["message"]
    assert enqueued == ["flows.add_flow"]  # a worker finishes it


class _Huge(BaseHTTPRequestHandler):
    chunked = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"result": "' + b"x" * (17 * 1024 * 1024) + b'"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 1 << 20):
                piece = body[i : i + (1 << 20)]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_an_answer_over_the_size_cap_is_an_error_not_memory(chunked: bool) -> None:
    handler = type("Huge", (_Huge,), {"chunked": chunked, "protocol_version": "HTTP/1.1"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = PortalClient(
            member_id="huge", endpoint=f"http://127.0.0.1:{server.server_address[1]}/rest/"
        )
        with pytest.raises(ResponseLost, match="RESPONSE_TOO_LARGE"):
            client.call("profile", token="t" * 20)
    finally:
        server.shutdown()
        server.server_close()


# --- fair shares and per-user limits ----------------------------------------------------------


def test_bulk_work_leaves_slots_of_the_bucket_to_single_clicks() -> None:
    limiter = PortalRateLimiter("fairness-test", rate=1.0, burst=20)
    taken = 0
    with pytest.raises(RateLimited):
        for _ in range(100):
            limiter.acquire(0.0, reserve=INTERACTIVE_RESERVE)
            taken += 1
    assert taken == limiter.burst - INTERACTIVE_RESERVE
    for _ in range(INTERACTIVE_RESERVE):  # a colleague's clicks: no wait at all
        assert limiter.acquire(0.0) == 0.0
    with pytest.raises(RateLimited):
        limiter.acquire(0.0)


def test_one_user_hammering_the_api_gets_429_in_words_and_others_do_not(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    client, token = opened["client"], opened["token"]
    answers = [api(client, token, "POST", "/flows/api/add", {"flow": "x"}) for _ in range(8)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited and all(a.status_code == 400 for a in answers[: len(answers) - len(limited)])
    assert int(limited[0]["Retry-After"]) >= 1
    assert "Too many requests from you" in limited[0].json()["error"]
    other = open_app(client, sandbox, 3)
    assert api(client, other, "POST", "/flows/api/add", {"flow": "x"}).status_code == 400


@pytest.mark.parametrize("ids", ["²", "1,²,3", "٣", "1" * 40, ",,,", "-1"])
def test_status_ids_that_are_not_ascii_numbers_are_ignored_not_a_500(
    opened: dict[str, Any], ids: str
) -> None:
    answer = api(opened["client"], opened["token"], "GET", f"/flows/api/status?ids={ids}")
    assert answer.status_code == 200


def test_outages_do_not_use_up_the_budget_for_unexpected_errors(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    """Five outage retries, then one bug: that is one unexpected error, not the fifth."""
    portal = opened["portal"]
    intents.set_desired(portal, USER, visible_to(sandbox, USER)[:1], True)
    for _ in range(converge.MAX_UNEXPECTED_FAILURES):
        converge.count_failure(portal.pk, USER)  # what an outage's backoff counts
    outcome = converge.unexpected_failure(portal.pk, USER)
    assert outcome.kind is Kind.RETRY and outcome.delay >= 1.0
    assert PinIntent.objects.get().status == PinIntent.Status.PENDING
    for _ in range(converge.MAX_UNEXPECTED_FAILURES - 2):
        assert converge.unexpected_failure(portal.pk, USER).kind is Kind.RETRY
    given_up = converge.unexpected_failure(portal.pk, USER)  # the fifth unexpected one
    assert given_up.kind is Kind.FINAL
    assert PinIntent.objects.get().problem == Problem.INTERNAL


@pytest.mark.parametrize(
    ("who_must_act", "status", "words"),
    [("user", 409, "reopen the app"), ("admin", 403, "not installed on this portal")],
)
def test_an_add_that_someone_must_act_on_says_who_and_adds_nothing(
    sandbox: Any, opened: dict[str, Any], who_must_act: str, status: int, words: str
) -> None:
    from b24app import tokens
    from b24app.models import PortalUser
    from flows.models import Flow

    portal = opened["portal"]
    user = PortalUser.objects.get(portal=portal, user_id=USER)
    known = set(Flow.objects.values_list("flow_id", flat=True))
    hidden = sb(sandbox, "p/alpha/flow", {"name": "По ссылке", "access": ["U2"]})["created"]
    if who_must_act == "user":
        tokens.mark_user_needs_reopen(user.pk, "test: the session ended")
    else:
        tokens.mark_portal_needs_reinstall(portal.pk, "test: the app was removed")
    answer = api(opened["client"], opened["token"], "POST", "/flows/api/add", {"flow": str(hidden)})
    assert answer.status_code == status
    assert words in answer.json()["error"]
    assert set(Flow.objects.values_list("flow_id", flat=True)) == known
