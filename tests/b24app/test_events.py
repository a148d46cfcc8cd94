"""Lifecycle events as Bitrix24 sends them (form-encoded, bracket keys), delivered by the
simulated portal to the live app over HTTP."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import pytest
import redis as redis_lib
from django.conf import settings
from django.test import Client
from django.utils import timezone

from b24app.models import Portal, PortalUser, RestCall
from b24app.problems import Problem
from b24app.redisconn import redis_client
from flows.models import Flow, PinIntent, PinRead
from tests.helpers import (
    WORKER,
    api,
    install,
    launch,
    open_app,
    portal_pins,
    post_frame,
    sb,
    settle_background_work,
    state,
    visible_to,
    worker_paused,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def app_sandbox(sandbox: Any, live_server: Any) -> Any:
    """The sandbox, delivering events to this test's live app."""
    sandbox.state.app_url = live_server.url
    return sandbox


def send(sandbox: Any, live_server: Any, event: str, **extra: Any) -> dict[str, Any]:
    result = sb(
        sandbox,
        "p/alpha/event",
        {"event": event, "handler": f"{live_server.url}/b24/events/", **extra},
    )
    assert len(result["deliveries"]) == 1
    return result["deliveries"][0]


def post_event(payload: dict[str, str]) -> Any:
    """POST an event body the way Bitrix24 does: application/x-www-form-urlencoded."""
    return Client().post(
        "/b24/events/", data=urlencode(payload), content_type="application/x-www-form-urlencoded"
    )


def _wait_for(predicate: Any, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_onappinstall_is_verified_through_the_oauth_server_and_stores_the_portal(
    app_sandbox: Any, live_server: Any
) -> None:
    delivery = send(app_sandbox, live_server, "ONAPPINSTALL")
    assert delivery["status"] == 200, delivery["body"]
    truth = state(app_sandbox)
    portal = Portal.objects.get()
    assert portal.member_id == truth["member_id"]
    assert portal.application_token == truth["application_token"]
    assert PortalUser.objects.get(portal=portal).has_tokens


@pytest.mark.services
def test_onappupdate_stores_the_new_application_token_and_binds_again(
    app_sandbox: Any, live_server: Any, celery_worker_process: Any
) -> None:
    install(Client(), app_sandbox)
    old_token = Portal.objects.get().application_token
    delivery = send(app_sandbox, live_server, "ONAPPUPDATE", rotate_application_token=True)
    assert delivery["status"] == 200, delivery["body"]
    portal = Portal.objects.get()
    assert portal.application_token != old_token
    assert portal.application_token == state(app_sandbox)["application_token"]
    # An update drops event bindings; the worker binds them again.
    assert _wait_for(lambda: len(state(app_sandbox)["events"]) == 2), state(app_sandbox)["events"]


def test_onappuninstall_deletes_every_token_and_a_reinstall_starts_clean(
    app_sandbox: Any, live_server: Any
) -> None:
    client = Client()
    install(client, app_sandbox)
    assert post_frame(client, launch(app_sandbox, "alpha", 2)).status_code == 200
    delivery = send(app_sandbox, live_server, "ONAPPUNINSTALL", clean=0)
    assert delivery["status"] == 200, delivery["body"]
    portal = Portal.objects.get()
    assert portal.state == Portal.State.UNINSTALLED
    assert portal.application_token == ""
    assert not any(u.access_token or u.refresh_token for u in PortalUser.objects.all())
    # A replayed uninstall is refused and changes nothing.
    replay = post_event(delivery["payload"])
    assert replay.status_code == 403
    # Reinstall: fresh start.
    install(client, app_sandbox)
    portal = Portal.objects.get()
    assert portal.state == Portal.State.ACTIVE
    assert portal.application_token == state(app_sandbox)["application_token"]


def _payload(sandbox: Any, event: str, **extra: Any) -> dict[str, str]:
    result = sb(sandbox, "p/alpha/event", {"event": event, "deliver": False, **extra})
    return dict(result["deliveries"][0]["payload"])


@pytest.mark.parametrize(
    ("mutate", "status", "words"),
    [
        (lambda p: p.update({"auth[application_token]": "wrong"}), 403, "does not match"),
        (lambda p: p.pop("auth[application_token]"), 403, "does not match"),
        (
            lambda p: p.update({"auth[member_id]": "ffffffffffffffffffffffffffffffff"}),
            403,
            "unknown portal",
        ),
        (lambda p: p.pop("auth[member_id]"), 400, "member_id"),
        (lambda p: p.pop("event"), 400, "no event"),
        (lambda p: p.update({"event": "ONCRMDEALADD"}), 400, "does not handle"),
    ],
)
def test_forged_events_are_refused_and_change_nothing(
    sandbox: Any, mutate: Any, status: int, words: str
) -> None:
    install(Client(), sandbox)
    payload = _payload(sandbox, "ONAPPUNINSTALL", clean=1)
    mutate(payload)
    response = post_event(payload)
    assert response.status_code == status
    assert words in response.content.decode()
    portal = Portal.objects.get()
    assert portal.state == Portal.State.ACTIVE
    assert PortalUser.objects.get().has_tokens


def test_events_must_be_form_encoded(sandbox: Any) -> None:
    install(Client(), sandbox)
    payload = _payload(sandbox, "ONAPPUNINSTALL")
    response = Client().post("/b24/events/", data=payload, content_type="application/json")
    assert response.status_code == 400
    assert Portal.objects.get().state == Portal.State.ACTIVE


def test_an_install_event_from_an_untrusted_oauth_server_is_refused(sandbox: Any) -> None:
    payload = _payload(sandbox, "ONAPPINSTALL")
    payload["auth[server_endpoint]"] = "https://oauth.evil.example/rest/"
    response = post_event(payload)
    assert response.status_code == 403
    assert Portal.objects.count() == 0


# --- uninstall on a portal with data, next to another portal --------------------------------


@contextmanager
def _worker_stopped() -> Iterator[None]:
    """The shared worker stopped while work is queued for it — kept queued (unlike
    `worker_paused`), so that it runs once the worker resumes."""
    proc = WORKER["proc"]
    assert WORKER["running"] and proc is not None
    settle_background_work()
    proc.pause()
    WORKER["running"] = False
    try:
        yield
    finally:
        proc.resume()
        WORKER["running"] = True


def _queue_drained(seconds: float = 30) -> None:
    """Every job in the broker taken and finished (acks_late: unacked until done)."""
    broker = redis_lib.Redis.from_url(settings.CELERY_BROKER_URL)
    deadline = time.monotonic() + seconds
    while any(broker.llen(q) for q in settings.FLOWPINS_QUEUES) or broker.hlen("unacked"):
        assert time.monotonic() < deadline, "the worker did not finish the queued work"
        time.sleep(0.1)
    broker.close()


def _portal_keys(portal_id: int, member_id: str) -> list[str]:
    """Every Redis key of the app naming this portal: fp:<kind…>:<portal id>[:<user id>]
    (lists, locks, markers, buckets) or fp:<kind>:<member_id>[:…] (rate limits)."""
    own = re.compile(rf"^fp:(?:[A-Za-z_]+:)+{portal_id}(?::\d+)?$")
    return sorted(
        key
        for raw in redis_client().scan_iter(match="fp:*", count=1000)
        if own.match(key := raw.decode()) or f":{member_id}" in key
    )


def _rows(portal_id: int, member_id: str) -> dict[str, int]:
    return {
        "users": PortalUser.objects.filter(portal_id=portal_id).count(),
        "flows": Flow.objects.filter(portal_id=portal_id).count(),
        "intents": PinIntent.objects.filter(portal_id=portal_id).count(),
        "pending": PinIntent.objects.filter(
            portal_id=portal_id, status=PinIntent.Status.PENDING
        ).count(),
        "reads": PinRead.objects.filter(portal_id=portal_id).count(),
        "calls": RestCall.objects.filter(member_id=member_id).count(),
    }


def _two_portals_with_work(sandbox: Any) -> dict[str, Any]:
    """alpha and beta installed and in use: users, flows, settled and pending pins, pin reads,
    list snapshots in Redis, the call log; the worker stopped with pin work queued for both."""
    client = Client()
    with worker_paused():
        install(client, sandbox, "alpha")
        install(client, sandbox, "beta")
        tokens = {
            ("alpha", 1): open_app(client, sandbox, 1, "alpha"),
            ("alpha", 2): open_app(client, sandbox, 2, "alpha"),
            ("beta", 1): open_app(client, sandbox, 1, "beta"),
        }
    alpha = Portal.objects.get(member_id=state(sandbox, "alpha")["member_id"])
    beta = Portal.objects.get(member_id=state(sandbox, "beta")["member_id"])
    settled = visible_to(sandbox, 1, "alpha")[-1]
    PinIntent.objects.create(
        portal=alpha, user_id=1, flow_id=settled, desired=True, observed=True,
        status=PinIntent.Status.DONE,
    )  # fmt: skip
    for portal in (alpha, beta):
        PinRead.objects.create(portal=portal, user_id=1, read_at=timezone.now())
    stopped = _worker_stopped()
    stopped.__enter__()
    clicks = {
        ("alpha", 1): visible_to(sandbox, 1, "alpha")[:2],
        ("alpha", 2): visible_to(sandbox, 2, "alpha")[:3],
        ("beta", 1): visible_to(sandbox, 1, "beta")[:2],
    }
    for (name, user_id), flow_ids in clicks.items():
        body = {"flow_ids": flow_ids, "pinned": True}
        answer = api(client, tokens[(name, user_id)], "POST", "/flows/api/pin", body)
        assert answer.status_code == 202, answer.content
    return {"alpha": alpha, "beta": beta, "clicks": clicks, "stopped": stopped}


def _sandbox_view(sandbox: Any, name: str) -> dict[str, Any]:
    seen = state(sandbox, name)
    return {"requests": seen["counters"]["requests"], "pins": seen["pins"]}


def _resume_and_settle(sandbox: Any, setup: dict[str, Any]) -> None:
    """The worker runs what was queued; beta's clicks reaching beta prove it ran."""
    setup["stopped"].__exit__(None, None, None)
    wanted = set(setup["clicks"][("beta", 1)])
    assert _wait_for(lambda: portal_pins(sandbox, 1, "beta") == wanted, 30)
    _queue_drained()


@pytest.mark.services
def test_uninstall_with_clean_deletes_every_row_and_key_of_that_portal_and_its_pending_pins(
    app_sandbox: Any, live_server: Any, celery_worker_process: Any
) -> None:
    setup = _two_portals_with_work(app_sandbox)
    alpha, beta = setup["alpha"], setup["beta"]
    try:
        had = _rows(alpha.pk, alpha.member_id)
        assert all(had.values()) and had["pending"] == 5, had  # something of each to delete
        assert any(":snap:" in key for key in _portal_keys(alpha.pk, alpha.member_id))
        beta_rows, beta_keys = _rows(beta.pk, beta.member_id), _portal_keys(beta.pk, beta.member_id)
        assert all(beta_rows.values()) and beta_keys
        alpha_before = _sandbox_view(app_sandbox, "alpha")
        delivery = send(app_sandbox, live_server, "ONAPPUNINSTALL", clean=1)
        assert delivery["status"] == 200, delivery["body"]
        sent = delivery["payload"]  # form-encoded, as Bitrix24 posts it
        assert (sent["data[CLEAN]"], sent["auth[member_id]"]) == ("1", alpha.member_id)
        assert sent["auth[application_token]"] == alpha.application_token
        assert not Portal.objects.filter(pk=alpha.pk).exists()
        assert _rows(alpha.pk, alpha.member_id) == dict.fromkeys(had, 0)
        assert _portal_keys(alpha.pk, alpha.member_id) == []
    finally:
        _resume_and_settle(app_sandbox, setup)
    # The pins clicked before the uninstall never reach alpha; beta's work went on.
    assert _sandbox_view(app_sandbox, "alpha") == alpha_before
    assert _rows(alpha.pk, alpha.member_id) == dict.fromkeys(had, 0)
    assert _portal_keys(alpha.pk, alpha.member_id) == []
    assert Portal.objects.get(pk=beta.pk).state == Portal.State.ACTIVE
    after = _rows(beta.pk, beta.member_id)
    assert after["pending"] == 0 and after["calls"] > beta_rows["calls"]  # it converged
    assert {k: v for k, v in after.items() if k not in ("pending", "calls")} == {
        k: v for k, v in beta_rows.items() if k not in ("pending", "calls")
    }
    lists = [k for k in beta_keys if k.startswith(("fp:snap:", "fp:snapver:"))]
    assert lists and set(lists) <= set(_portal_keys(beta.pk, beta.member_id))


@pytest.mark.services
def test_uninstall_without_clean_deletes_the_tokens_keeps_the_data_and_cancels_pending_pins(
    app_sandbox: Any, live_server: Any, celery_worker_process: Any
) -> None:
    setup = _two_portals_with_work(app_sandbox)
    alpha = setup["alpha"]
    try:
        had = _rows(alpha.pk, alpha.member_id)
        alpha_before = _sandbox_view(app_sandbox, "alpha")
        delivery = send(app_sandbox, live_server, "ONAPPUNINSTALL", clean=0)
        assert delivery["status"] == 200, delivery["body"]
        # Cancelled by the uninstall itself, before any worker looks at them.
        waiting = PinIntent.objects.filter(portal_id=alpha.pk).exclude(status=PinIntent.Status.DONE)
        assert waiting.count() == 5
        assert set(waiting.values_list("status", "problem")) == {
            (PinIntent.Status.FAILED, Problem.REINSTALL)
        }
    finally:
        _resume_and_settle(app_sandbox, setup)
    assert _sandbox_view(app_sandbox, "alpha") == alpha_before  # no pending pin reached it
    portal = Portal.objects.get(pk=alpha.pk)
    assert (portal.state, portal.application_token) == (Portal.State.UNINSTALLED, "")
    users = PortalUser.objects.filter(portal=portal)
    assert users.count() == had["users"]
    assert all(
        (u.access_token, u.refresh_token, u.state) == ("", "", PortalUser.State.NEEDS_REOPEN)
        for u in users
    )
    assert _rows(alpha.pk, alpha.member_id) == {**had, "pending": 0}  # the data is kept
    assert set(waiting.values_list("status", "problem")) == {
        (PinIntent.Status.FAILED, Problem.REINSTALL)
    }
    assert PinIntent.objects.get(portal=portal, status=PinIntent.Status.DONE).observed is True
