"""Crashes and outages on the private stack: a worker killed mid-run, the broker restarted
mid-burst, and a portal in a 5xx storm or a latency spike longer than our read timeout."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import requests
from django.test import Client

from b24app.models import RestCall
from flows.models import PinIntent
from tests.faults.conftest import PrivateStack
from tests.faults.drive import assert_all_done_and_true, click_http, desired_pins, wait_settled
from tests.faults.stack import wait_until
from tests.helpers import install, launch, open_app, portal_pins, sb, state, visible_to

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def counters(sandbox: Any, portal: str = "alpha") -> dict[str, Any]:
    return dict(state(sandbox, portal)["counters"])


def test_a_worker_killed_mid_run_loses_nothing_and_doubles_nothing(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    client = Client()
    install(client, sandbox)
    tokens = {user: open_app(client, sandbox, user) for user in (2, 3)}
    f2, f3 = visible_to(sandbox, 2)[:5], visible_to(sandbox, 3)[:4]
    worker = private_stack.worker()
    sb(sandbox, "config", {"latency_ms": 1500})  # each toggle round is slow: the kill lands mid-run
    base = private_stack.web_url
    for flow in f2:  # row by row, so the work spans several rounds
        assert click_http(base, tokens[2], [flow], True).status_code == 202
        time.sleep(0.15)
    assert click_http(base, tokens[3], f3, True).status_code == 202
    wait_until(lambda: counters(sandbox)["pin_toggles"] >= 1, 20, "the first toggle")
    time.sleep(0.6)  # the next round's request is on its way to the portal
    worker.stop(signal.SIGKILL)  # the whole process group: main process and pool children
    assert PinIntent.objects.filter(status=PinIntent.Status.PENDING).exists(), (
        "the kill came too late to prove anything"
    )

    time.sleep(2.0)  # the dead worker's last request reaches the portal and is applied
    applied = counters(sandbox)["pin_toggles"]
    answered = sum(i.toggles for i in PinIntent.objects.all())
    assert applied > answered, "no toggle was on its way when the worker died"
    sb(sandbox, "config", {"latency_ms": 50})
    private_stack.worker()  # a restart: the same node name, as systemd or compose would do
    intents = wait_settled(40, expected=len(f2) + len(f3))

    assert portal_pins(sandbox, 2) == desired_pins(intents, 2) == set(f2)
    assert portal_pins(sandbox, 3) == desired_pins(intents, 3) == set(f3)
    assert_all_done_and_true(intents)  # one intent per click, none doubled, none lost
    assert portal_pins(sandbox, 1) == set() and portal_pins(sandbox, 4) == set()


def test_a_redis_restart_mid_burst_answers_503_then_every_pin_completes(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    client = Client()
    install(client, sandbox)
    tokens = {user: open_app(client, sandbox, user) for user in (1, 2, 3)}
    f1, f2, f3 = visible_to(sandbox, 1)[-2:], visible_to(sandbox, 2)[:4], visible_to(sandbox, 3)[:3]
    private_stack.worker()
    sb(sandbox, "config", {"latency_ms": 200})
    base = private_stack.web_url

    before = [(tokens[2], f2[0]), (tokens[3], f3[0]), (tokens[2], f2[1]), (tokens[3], f3[1])]
    for token, flow in before:
        assert click_http(base, token, [flow], True).status_code == 202
    private_stack.redis.kill()

    # Users 1 and 2 click only while the broker is down, and never again: their clicks are
    # saved, and must be applied once it is back without anybody clicking or restarting.
    during = [(tokens[1], f1[0]), (tokens[2], f2[2]), (tokens[1], f1[1]), (tokens[2], f2[3])]
    for token, flow in during:
        started = time.monotonic()
        response = click_http(base, token, [flow], True, timeout=5)
        assert time.monotonic() - started < 5
        assert response.status_code == 503
        assert "not available" in response.json()["error"]  # a sentence, not a stack trace
        assert response.json()["intents"][0]["desired"] is True  # the click is kept
    status = requests.get(
        f"{base}/flows/api/status", headers={"X-Flowpins-Token": tokens[2]}, timeout=5
    )
    assert status.status_code == 200  # reading the state needs no broker
    add = requests.post(
        f"{base}/flows/api/add",
        json={"flow": str(f2[0])},
        headers={"X-Flowpins-Token": tokens[2]},
        timeout=5,
    )
    assert add.status_code == 503 and "try again" in add.json()["error"]
    launched = launch(sandbox, "alpha", 3, lang="en")
    started = time.monotonic()
    page = requests.post(
        launched["url"].replace(sandbox.state.app_url, base), data=launched["form"], timeout=5
    )
    assert time.monotonic() - started < 5
    assert page.status_code == 503, page.text[:300]  # opening the app: words, not a 500
    assert "try again" in page.text

    time.sleep(1.0)
    private_stack.redis.start()  # empty: whatever was queued is gone with the old process
    response = click_http(base, tokens[3], [f3[2]], True)
    assert response.status_code == 202, response.text[:300]  # the first click after it is back

    intents = wait_settled(30, expected=len(f1) + len(f2) + len(f3))
    assert portal_pins(sandbox, 1) == desired_pins(intents, 1) == set(f1)
    assert portal_pins(sandbox, 2) == desired_pins(intents, 2) == set(f2)
    assert portal_pins(sandbox, 3) == desired_pins(intents, 3) == set(f3)
    assert_all_done_and_true(intents)


def test_5xx_storms_and_latency_spikes_back_off_and_leave_nothing_wrong(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    """Alpha in a 5xx storm, beta in a latency spike longer than our read timeout (1 s here),
    at the same time. A timed-out pin still toggles on the portal: only its answer is lost."""
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    alpha = {user: open_app(client, sandbox, user, "alpha") for user in (2, 3)}
    beta = open_app(client, sandbox, 2, "beta")
    a2, a3, b2 = (
        visible_to(sandbox, 2)[:3],
        visible_to(sandbox, 3)[:3],
        visible_to(sandbox, 2, "beta")[:3],
    )
    sb(sandbox, "p/beta/pins", {"user_id": 2, "flow_ids": [b2[0]], "pinned": True})
    # The sandbox's spike holds each request 1.5 s: that is this "portal's" request limit.
    private_stack.worker(B24_HTTP_READ_TIMEOUT="1", B24_PORTAL_REQUEST_SECONDS="2")
    base = private_stack.web_url

    sb(sandbox, "config", {"portal": "alpha", "error_5xx_ratio": 1.0, "latency_ms": 100})
    sb(sandbox, "config", {"portal": "beta", "latency_ms": 1500})
    before = {name: counters(sandbox, name) for name in ("alpha", "beta")}
    started = time.monotonic()
    rows = [(alpha[2], f) for f in a2] + [(alpha[3], f) for f in a3] + [(beta, f) for f in b2]
    for _ in range(3):  # an impatient user clicks every row again: each click may start a run
        for token, flow in rows:
            assert click_http(base, token, [flow], True).status_code == 202
        time.sleep(2)
    during = {name: counters(sandbox, name) for name in ("alpha", "beta")}
    seconds = time.monotonic() - started
    sb(sandbox, "config", {"portal": "alpha", "error_5xx_ratio": None, "latency_ms": None})
    sb(sandbox, "config", {"portal": "beta", "latency_ms": None})

    intents = wait_settled(40, expected=9)
    assert portal_pins(sandbox, 2) == set(a2) and portal_pins(sandbox, 3) == set(a3)
    assert portal_pins(sandbox, 2, "beta") == set(b2)
    assert_all_done_and_true(intents)

    storm = during["alpha"]["requests"] - before["alpha"]["requests"]
    spike = during["beta"]["requests"] - before["beta"]["requests"]
    assert during["alpha"]["faults_5xx"] - before["alpha"]["faults_5xx"] == storm >= 2
    assert during["beta"]["pin_toggles"] - before["beta"]["pin_toggles"] >= 1  # applied...
    assert RestCall.objects.filter(error="READ_TIMEOUT").exists()  # ...and never answered
    # No hot loop: per user, one request per backoff interval (at least 2 s after a 5xx; a
    # lost answer costs the 1 s timeout plus at least 1 s), however many clicks started runs.
    assert storm <= 2 * (seconds / 2 + 1.5), storm
    assert spike <= 1 * (seconds / 2 + 1.5), spike
