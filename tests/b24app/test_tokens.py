"""Per-user tokens, the locked refresh, the shared rate limiter and the REST client, against the
simulated portal over HTTP with PostgreSQL row locks and Redis."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from django.db import close_old_connections, connection
from django.test import Client

from b24app import tokens
from b24app.bitrix import errors, oauth
from b24app.bitrix.errors import ReinstallRequired, ReopenRequired
from b24app.models import Portal, PortalUser, RestCall
from b24app.problems import Problem
from flows import converge, intents
from flows.models import PinIntent
from flows.outcome import Kind
from tests.helpers import (
    install,
    launch,
    post_frame,
    sb,
    settle_background_work,
    state,
    worker_paused,
)

pytestmark = [pytest.mark.django_db(transaction=True)]


def _profile(user: PortalUser) -> Any:
    return tokens.call_with_user(user, lambda c, t: c.call("profile", token=t).result)


@pytest.mark.services
def test_fifty_concurrent_calls_on_an_expired_token_refresh_exactly_once(sandbox: Any) -> None:
    install(Client(), sandbox)
    # Room for 100 calls at once on both sides: this test is about the refresh, not the bucket.
    sb(sandbox, "config", {"portal": "alpha", "rate": 50, "burst": 200})
    Portal.objects.update(rate_per_second=50, rate_burst=200)
    admin = PortalUser.objects.get(user_id=1)
    sb(sandbox, "p/alpha/expire", {"user_id": 1})
    before = state(sandbox)["counters"]["refresh_ok"]
    barrier = threading.Barrier(50)

    def worker(_: int) -> Any:
        try:
            user = PortalUser.objects.get(pk=admin.pk)
            barrier.wait(timeout=30)
            return _profile(user)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(worker, range(50)))
    close_old_connections()
    assert all(r["ID"] == "1" for r in results)  # all 50 succeeded, as user 1
    truth = state(sandbox)["counters"]
    assert truth["refresh_ok"] - before == 1
    assert truth["refresh_failed"] == 0
    assert PortalUser.objects.get(pk=admin.pk).state == PortalUser.State.ACTIVE


def test_a_passed_expiry_refreshes_before_the_call(sandbox: Any) -> None:
    install(Client(), sandbox)
    PortalUser.objects.filter(user_id=1).update(expires_at=None)
    assert _profile(PortalUser.objects.get(user_id=1))["ID"] == "1"
    counters = state(sandbox)["counters"]
    assert counters["refresh_ok"] == 1
    assert counters["errors"].get("expired_token", 0) == 0  # no wasted call


def test_a_dead_refresh_token_asks_the_user_to_reopen_and_stops(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    user = PortalUser.objects.get(user_id=2)
    # Someone else used the refresh token (rotation kills it), and the access token expired.
    used = requests.post(
        f"{sandbox.url}/oauth/token/",
        data={
            "grant_type": "refresh_token",
            "client_id": "local.sandbox0000000001",
            "client_secret": "sandbox-client-secret",
            "refresh_token": user.refresh_token,
        },
        timeout=5,
    )
    assert used.status_code == 200
    with pytest.raises(ReopenRequired):
        _profile(user)
    user.refresh_from_db()
    assert user.state == PortalUser.State.NEEDS_REOPEN
    assert "invalid_grant" in user.state_reason
    assert user.access_token == "" and user.refresh_token == ""
    settle_background_work()  # the list refresh the open queued may still be on its way
    calls = state(sandbox)["counters"]["requests"]
    with pytest.raises(ReopenRequired):  # no further REST or OAuth traffic
        _profile(user)
    assert state(sandbox)["counters"]["requests"] == calls
    # Opening the app again brings fresh tokens and the user is back.
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    assert _profile(PortalUser.objects.get(user_id=2))["ID"] == "2"


def test_payment_required_marks_the_portal_for_the_admin(sandbox: Any) -> None:
    install(Client(), sandbox)
    sb(sandbox, "config", {"portal": "alpha", "payment_expired": True})
    sb(sandbox, "p/alpha/expire", {})
    with pytest.raises(ReinstallRequired):
        _profile(PortalUser.objects.get(user_id=1))
    assert Portal.objects.get().state == Portal.State.NEEDS_REINSTALL


@pytest.mark.services
def test_a_burst_of_200_calls_never_meets_a_503_and_spares_other_portals(sandbox: Any) -> None:
    # No worker job may call either portal meanwhile (a list refresh the installs queued, still
    # paced at the default 2/s): the buckets must hold only this test's calls.
    with worker_paused():
        _burst_of_200_spares_other_portals(sandbox)


def _burst_of_200_spares_other_portals(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    # A scaled-down limit so the test takes seconds: 40 requests/s, burst 10, on both sides and
    # for both portals.
    for name in ("alpha", "beta"):
        sb(sandbox, "config", {"portal": name, "rate": 40, "burst": 10})
        Portal.objects.filter(member_id=state(sandbox, name)["member_id"]).update(
            rate_per_second=40, rate_burst=10
        )
    alpha = PortalUser.objects.get(portal__member_id=state(sandbox, "alpha")["member_id"])
    beta = PortalUser.objects.get(portal__member_id=state(sandbox, "beta")["member_id"])
    beta_answers: list[Any] = []
    beta_failures: list[BaseException] = []
    stop = threading.Event()

    def beta_calls() -> None:
        # No wait allowed (max_wait=0): were beta's calls counted in alpha's full bucket, the
        # first would be refused with RateLimited instead of sleeping.
        try:
            while not stop.is_set():
                user = PortalUser.objects.get(pk=beta.pk)
                beta_answers.append(
                    tokens.call_with_user(
                        user, lambda c, t: c.call("profile", token=t).result, max_wait=0
                    )
                )
                time.sleep(0.2)
        except BaseException as exc:  # reported by the test below, not as a thread warning
            beta_failures.append(exc)
        finally:
            connection.close()

    def alpha_call(_: int) -> Any:
        try:
            return tokens.call_with_user(
                PortalUser.objects.get(pk=alpha.pk),
                lambda c, t: c.call("profile", token=t).result,
                max_wait=30,
            )
        finally:
            connection.close()

    # The install's own calls sit in beta's bucket, counted at the default 2/s: one call that
    # may wait for them to drain, so that from now on beta's bucket has room.
    tokens.call_with_user(beta, lambda c, t: c.call("profile", token=t).result, max_wait=30)
    side = threading.Thread(target=beta_calls)
    side.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(alpha_call, range(200)))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        side.join()
    close_old_connections()
    assert not beta_failures, beta_failures  # beta never waited on alpha's bucket
    assert len(beta_answers) >= 3, beta_answers  # beta called while alpha was busy
    assert all(r["ID"] == "1" for r in beta_answers)
    assert len(results) == 200 and all(r["ID"] == "1" for r in results)
    assert state(sandbox, "alpha")["counters"]["http_503"] == 0
    assert state(sandbox, "beta")["counters"]["http_503"] == 0
    assert elapsed >= (200 - 10) / 40 * 0.9  # it really was paced by the bucket


def test_a_renamed_portal_is_followed_and_remembered(sandbox: Any) -> None:
    install(Client(), sandbox)
    sb(sandbox, "p/alpha/rename", {"new_name": "alpha2"})
    assert _profile(PortalUser.objects.get(user_id=1))["ID"] == "1"
    portal = Portal.objects.get()
    renamed = state(sandbox, "alpha2")
    assert portal.client_endpoint == renamed["client_endpoint"]  # the new host, confirmed
    assert oauth.origin_of(portal.client_endpoint) != renamed["old_origins"][0]
    assert RestCall.objects.filter(error="MOVED").count() == 1


def test_operation_time_limit_pauses_the_method_until_reset(sandbox: Any) -> None:
    install(Client(), sandbox)
    sb(sandbox, "config", {"portal": "alpha", "operating_cost": 5, "operating_limit": 4})
    user = PortalUser.objects.get(user_id=1)
    _profile(user)  # consumes 5 s of "operating time": over the limit of 4
    with pytest.raises(errors.OperationTimeLimit) as first:
        _profile(user)
    assert first.value.reset_at > time.time()
    calls = state(sandbox)["counters"]["requests"]
    with pytest.raises(errors.OperationTimeLimit):
        _profile(user)  # paused locally: the portal is not asked again
    assert state(sandbox)["counters"]["requests"] == calls
    # Other methods are not paused.
    result = tokens.call_with_user(user, lambda c, t: c.call("app.info", token=t).result)
    assert "INSTALLED" in result


def test_rest_call_metadata_is_kept_without_secrets(sandbox: Any) -> None:
    install(Client(), sandbox)
    _profile(PortalUser.objects.get(user_id=1))
    rows = list(RestCall.objects.values_list("member_id", "method", "http_status", "error"))
    assert ("profile" in [r[1] for r in rows]) and ("batch" in [r[1] for r in rows])
    assert all(r[0] == state(sandbox)["member_id"] for r in rows)
    user = PortalUser.objects.get(user_id=1)
    dump = repr(list(RestCall.objects.values()))
    assert user.access_token not in dump and user.refresh_token not in dump


def test_no_secret_reaches_the_logs(sandbox: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = Client()
    launched = launch(sandbox, "alpha", 1, installer=True)
    installed = post_frame(client, launched)
    assert installed.status_code == 200, installed.content.decode()[-600:]
    sb(sandbox, "p/alpha/expire", {})
    _profile(PortalUser.objects.get(user_id=1))
    refused = post_frame(client, launch(sandbox, "alpha", 1), APPLICATION_TOKEN="forged-app-tok")
    assert refused.status_code == 403  # and the refusal is logged
    user = PortalUser.objects.get(user_id=1)
    secrets = [
        launched["form"]["AUTH_ID"],
        launched["form"]["REFRESH_ID"],
        user.access_token,
        user.refresh_token,
        state(sandbox)["application_token"],
        "sandbox-client-secret",
    ]
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert caplog.records  # something was logged at all
    for secret in secrets:
        assert secret, secrets.index(secret)
        assert secret not in text


def test_an_idle_chain_is_refreshed_before_its_refresh_token_dies(sandbox: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    long_ago = timezone.now() - timedelta(days=160)
    PortalUser.objects.filter(user_id=2).update(last_seen_at=long_ago, refreshed_at=None)
    old = PortalUser.objects.get(user_id=2)
    assert tokens.keep_idle_tokens_alive() == 1  # user 1 was active recently: left alone
    fresh = PortalUser.objects.get(user_id=2)
    assert fresh.refresh_token != old.refresh_token and fresh.refreshed_at is not None
    assert state(sandbox)["counters"]["refresh_ok"] == 1
    assert tokens.keep_idle_tokens_alive() == 0  # and not again the next hour
    assert _profile(fresh)["ID"] == "2"


def test_query_limit_exceeded_from_the_portal_holds_every_caller_back(sandbox: Any) -> None:
    """The portal's bucket is smaller than ours (another app on our IP, a lower plan): it
    answers 503 QUERY_LIMIT_EXCEEDED. Then our shared bucket counts as full, so the next caller
    — any process — waits at least one interval instead of hitting the portal at once."""
    install(Client(), sandbox)
    sb(sandbox, "config", {"portal": "alpha", "rate": 0.5, "burst": 1})  # we assume 2/s, 50
    user = PortalUser.objects.get(user_id=1)
    refused = None
    for _ in range(3):  # the install's calls may have filled the portal's bucket already
        try:
            _profile(user)
        except errors.RateLimited as exc:
            refused = exc
            break
    assert refused is not None and refused.code == "QUERY_LIMIT_EXCEEDED"
    assert RestCall.objects.filter(error="QUERY_LIMIT_EXCEEDED").exists()
    asked = state(sandbox)["counters"]["requests"]
    with pytest.raises(errors.RateLimited) as held:  # a caller that may not wait at all
        tokens.call_with_user(user, lambda c, t: c.call("profile", token=t).result, max_wait=0)
    assert held.value.code == "LOCAL_RATE_LIMIT" and held.value.retry_after > 0
    assert state(sandbox)["counters"]["requests"] == asked  # the portal was not asked
    # A caller that may wait gets through once the portal's bucket has drained.
    sb(sandbox, "config", {"portal": "alpha", "rate": 50})
    assert (
        tokens.call_with_user(user, lambda c, t: c.call("profile", token=t).result, max_wait=30)[
            "ID"
        ]
        == "1"
    )
    assert state(sandbox)["counters"]["http_503"] >= 1


def test_a_lost_refresh_answer_asks_the_user_to_reopen_once_without_looping_or_leaking(
    sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The OAuth server rotated the user's refresh token, and its answer never reached us: the
    only refresh token we hold is spent. The call fails as an outage (we cannot know yet);
    the next one asks once more, learns the chain is dead (invalid_grant) and asks the user to
    reopen the app; after that, nothing is sent until they do. No token reaches the logs."""
    caplog.set_level(logging.DEBUG)
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    settle_background_work()
    user = PortalUser.objects.get(user_id=2)
    spent = (user.access_token, user.refresh_token)
    sb(sandbox, "p/alpha/expire", {"user_id": 2})
    sb(sandbox, "config", {"portal": "alpha", "refresh_drop_ratio": 1.0})

    with pytest.raises(errors.TransientError):
        _profile(user)
    truth = state(sandbox)["counters"]
    assert (truth["refresh_ok"], truth["refresh_dropped"]) == (1, 1)  # rotated, answer lost
    user.refresh_from_db()
    assert user.state == PortalUser.State.ACTIVE  # not concluded from a lost answer alone

    sb(sandbox, "config", {"portal": "alpha", "refresh_drop_ratio": None})
    with pytest.raises(ReopenRequired):
        _profile(user)
    user.refresh_from_db()
    assert user.state == PortalUser.State.NEEDS_REOPEN and "invalid_grant" in user.state_reason
    assert user.access_token == "" and user.refresh_token == ""
    truth = state(sandbox)["counters"]
    assert truth["refresh_failed"] == 1  # one refresh with the spent token, no more
    for _ in range(3):  # and no traffic at all until the user reopens the app
        with pytest.raises(ReopenRequired):
            _profile(user)
    again = state(sandbox)["counters"]
    assert (again["requests"], again["refresh_failed"]) == (truth["requests"], 1)

    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200  # reopened
    assert _profile(PortalUser.objects.get(user_id=2))["ID"] == "2"
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (*spent, "sandbox-client-secret"):
        assert secret and secret not in text


def test_a_click_whose_refresh_answer_is_lost_ends_in_reopen_after_one_retry(
    sandbox: Any,
) -> None:
    """The same lost refresh answer under a convergence run: the run backs off like an outage,
    the next one learns the chain is dead and fails the pin with "reopen the app" — it does
    not toggle, and does not try again by itself."""
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    settle_background_work()
    portal = Portal.objects.get()
    flow = next(f["id"] for f in state(sandbox)["flows"] if 2 in f["visible_to"])
    intents.set_desired(portal, 2, [flow], True)
    sb(sandbox, "p/alpha/expire", {"user_id": 2})
    sb(sandbox, "config", {"portal": "alpha", "refresh_drop_ratio": 1.0})

    first = converge.converge_user(portal.pk, 2)
    assert first.kind is Kind.RETRY, first
    sb(sandbox, "config", {"portal": "alpha", "refresh_drop_ratio": None})
    second = converge.converge_user(portal.pk, 2)
    assert second.kind is Kind.FINAL, second
    intent = PinIntent.objects.get()
    assert (intent.status, intent.problem) == (PinIntent.Status.FAILED, Problem.REOPEN)
    truth = state(sandbox)["counters"]
    assert truth["pin_toggles"] == 0 and truth["refresh_failed"] == 1
    assert converge.converge_user(portal.pk, 2).kind is Kind.DONE  # nothing left to try
    assert state(sandbox)["counters"]["requests"] == truth["requests"]
