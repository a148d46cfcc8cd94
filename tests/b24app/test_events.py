"""Lifecycle events as Bitrix24 sends them (form-encoded, bracket keys), delivered by the
simulated portal to the live app over HTTP."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from b24app.models import Portal, PortalUser
from tests.helpers import install, launch, post_frame, sb, state

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


def test_onappuninstall_with_clean_deletes_all_data(app_sandbox: Any, live_server: Any) -> None:
    install(Client(), app_sandbox)
    delivery = send(app_sandbox, live_server, "ONAPPUNINSTALL", clean=1)
    assert delivery["status"] == 200, delivery["body"]
    assert Portal.objects.count() == 0
    assert PortalUser.objects.count() == 0


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
