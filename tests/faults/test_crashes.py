"""Crashes and outages on the private stack: a worker killed mid-run, the broker restarted
mid-burst, and a portal in a 5xx storm or a latency spike longer than our read timeout."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
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


# A request to the app while its broker is down is answered (in words) within this, not after
# the broker's retries: generous for a loaded machine, far below a hang.
ANSWER_SECONDS = 5.0


def counters(sandbox: Any, portal: str = "alpha") -> dict[str, Any]:
    return dict(state(sandbox, portal)["counters"])


def answered_within(
    seconds: float, what: str, send: Callable[..., requests.Response], *args: Any, **kw: Any
) -> requests.Response:
    """`send(*args, timeout=seconds)`'s answer, or a failure naming `what` when none came in
    time (the bound is the request's own timeout: a clock read after it could not exceed it)."""
    try:
        return send(*args, timeout=seconds, **kw)
    except requests.Timeout:
        pytest.fail(f"{what} got no answer within {seconds:.0f} s while the broker was down")


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
        response = answered_within(ANSWER_SECONDS, "a click", click_http, base, token, [flow], True)
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
    page = answered_within(
        ANSWER_SECONDS,
        "opening the app",
        requests.post,
        launched["url"].replace(sandbox.state.app_url, base),
        data=launched["form"],
    )
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


def test_after_a_read_timeout_the_flow_is_left_alone_until_the_portal_must_be_done(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    """A toggle whose answer timed out still lands on the portal, seconds later. A second toggle
    sent before it lands is answered first and then undone by it, and the app believes a state
    the portal no longer has: so the flow waits until the portal's own per-request limit has
    passed, and only then asks again."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, 2)
    flow = visible_to(sandbox, 2)[0]
    # Our read timeout is 1 s and this "portal" gives up on a request after 5 s: a flow whose
    # answer timed out waits 5 s. The first request takes 3.5 s: it lands 2.5 s after we gave up.
    private_stack.worker(B24_HTTP_READ_TIMEOUT="1", B24_PORTAL_REQUEST_SECONDS="5")
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": 3500})
    clicked = time.time()  # the sandbox's clock is this machine's
    assert click_http(private_stack.web_url, token, [flow], True).status_code == 202
    wait_until(
        lambda: RestCall.objects.filter(error="READ_TIMEOUT").exists(), 20, "the read timeout"
    )
    assert counters(sandbox)["pin_toggles"] == 0, "the slow toggle landed before we gave up"
    sb(sandbox, "config", {"portal": "alpha", "latency_ms": None})  # the next ones answer at once

    intents = wait_settled(40, expected=1)

    def toggles() -> list[dict[str, Any]]:
        log = state(sandbox)["pin_log"]
        return [e for e in log if (e["user_id"], e["flow_id"]) == (2, flow)]

    # Judge only once the slow toggle has landed: until then the portal may look right.
    wait_until(lambda: any(e["ts"] >= clicked + 3.5 for e in toggles()), 20, "the slow toggle")
    assert portal_pins(sandbox, 2) == {flow}
    assert_all_done_and_true(intents)
    log = toggles()
    # The late toggle landed (pinned), then the next one went out and told the state (unpinned),
    # then one more: no toggle overtook the one still running at the portal.
    assert [e["pinned"] for e in log] == [True, False, True], log
