"""Cross-tenant: the page token of one user of portal A acts for that user on A, and nowhere
else — not on portal B (whose flow ids overlap A's), not for another user of A."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from django.core import signing
from django.test import Client

from b24app.models import Portal
from flows.apiauth import TOKEN_SALT
from flows.models import Flow, PinIntent
from tests.faults.drive import click, wait_settled
from tests.helpers import install, open_app, portal_pins, sb, state

pytestmark = pytest.mark.django_db(transaction=True)


def status(client: Client, token: str, query: str = "") -> Any:
    return client.get(f"/flows/api/status{query}", HTTP_X_FLOWPINS_TOKEN=token)


@pytest.fixture
def two_portals(sandbox: Any) -> dict[str, Any]:
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    return {
        "client": client,
        "a2": open_app(client, sandbox, 2, "alpha"),
        "a3": open_app(client, sandbox, 3, "alpha"),
        "b2": open_app(client, sandbox, 2, "beta"),
        "alpha": Portal.objects.get(member_id=state(sandbox, "alpha")["member_id"]),
        "beta": Portal.objects.get(member_id=state(sandbox, "beta")["member_id"]),
    }


@pytest.mark.services
def test_a_page_token_pins_only_for_its_own_user_on_its_own_portal(
    sandbox: Any, two_portals: dict[str, Any], celery_worker_process: Any
) -> None:
    client, t = two_portals["client"], two_portals
    shared = 101  # a flow id both portals have, visible to user 2 on each
    body = {
        "flow_ids": [shared],
        "pinned": True,
        # Whatever the page sends about who it is, it is ignored: the token decides.
        "user_id": 3,
        "portal": t["beta"].pk,
        "member_id": t["beta"].member_id,
    }
    response = client.post(
        "/flows/api/pin",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_X_FLOWPINS_TOKEN=t["a2"],
    )
    assert response.status_code == 202
    wait_settled(30)

    assert list(PinIntent.objects.values_list("portal_id", "user_id", "flow_id")) == [
        (t["alpha"].pk, 2, shared)
    ]
    assert portal_pins(sandbox, 2, "alpha") == {shared}
    assert portal_pins(sandbox, 3, "alpha") == set()
    assert portal_pins(sandbox, 2, "beta") == set()  # same user id, same flow id, other tenant


def test_a_page_token_reads_only_its_own_users_intents(
    sandbox: Any, two_portals: dict[str, Any]
) -> None:
    client, t = two_portals["client"], two_portals
    for token, flows in ((t["a2"], [101, 103]), (t["a3"], [102, 106]), (t["b2"], [104, 107])):
        assert click(client, token, flows, True).status_code == 202
    asked = "?ids=101,102,103,104,106,107"  # everybody's flows, named on purpose
    seen = {
        who: sorted(i["flow_id"] for i in status(client, t[who], asked).json()["intents"])
        for who in ("a2", "a3", "b2")
    }
    assert seen == {"a2": [101, 103], "a3": [102, 106], "b2": [104, 107]}


def test_forged_and_foreign_page_tokens_are_refused(
    sandbox: Any, two_portals: dict[str, Any]
) -> None:
    client, t = two_portals["client"], two_portals
    beta = t["beta"]
    claims = {"p": beta.pk, "u": 2, "l": "en"}
    theirs = signing.dumps(claims, salt=TOKEN_SALT, key="not-our-secret-key")
    forged = [
        # A's token with its claims swapped for B's; A's timestamp and signature kept.
        theirs.split(":")[0] + ":" + t["a2"].split(":", 1)[1],
        # B's claims, signed with a key that is not ours.
        signing.dumps(claims, salt=TOKEN_SALT, key="not-our-secret-key"),
        # B's claims, signed with our key but for another purpose (another salt).
        signing.dumps(claims, key=django_settings.SECRET_KEY),
        t["a2"] + "x",
        "",
    ]
    for token in forged:
        pinned = click(client, token, [101], True)
        read = status(client, token)
        assert pinned.status_code in (401, 403), token
        assert read.status_code in (401, 403), token
        assert "error" in pinned.json()
    assert PinIntent.objects.count() == 0


def test_a_page_token_dies_with_its_portals_installation(
    sandbox: Any, two_portals: dict[str, Any]
) -> None:
    client, t = two_portals["client"], two_portals
    old = sb(sandbox, "p/alpha/event", {"event": "ONAPPUNINSTALL", "deliver": False})
    gone = client.post(
        "/b24/events/",
        data=urlencode(old["deliveries"][0]["payload"]),
        content_type="application/x-www-form-urlencoded",
    )
    assert gone.status_code == 200
    assert click(client, t["a2"], [101], True).status_code == 403
    assert status(client, t["a2"]).status_code == 403
    assert click(client, t["b2"], [101], True).status_code in (202, 503)  # beta is untouched
    assert list(PinIntent.objects.values_list("portal_id", flat=True)) == [t["beta"].pk]


def test_a_flow_of_another_portal_cannot_be_added_or_learnt(
    sandbox: Any, two_portals: dict[str, Any]
) -> None:
    """Alpha has a flow 110, beta has none: beta's user cannot add it, nor learn its name."""
    client, t = two_portals["client"], two_portals
    alpha_only = 110
    assert alpha_only in {f["id"] for f in state(sandbox, "alpha")["flows"]}
    assert alpha_only not in {f["id"] for f in state(sandbox, "beta")["flows"]}
    response = client.post(
        "/flows/api/add",
        data=json.dumps({"flow": f"{sandbox.url}/p/alpha/tasks/flow/{alpha_only}/"}),
        content_type="application/json",
        HTTP_X_FLOWPINS_TOKEN=t["b2"],
    )
    assert response.status_code == 404
    name = next(f["name"] for f in state(sandbox, "alpha")["flows"] if f["id"] == alpha_only)
    assert name not in response.content.decode()
    assert not Flow.objects.filter(portal=t["beta"], flow_id=alpha_only).exists()


def test_the_page_api_refuses_malformed_bodies(sandbox: Any, two_portals: dict[str, Any]) -> None:
    client, t = two_portals["client"], two_portals
    for body in ("{nope", "[" * 5000, '"text"', "\x00\xff"):
        for path in ("/flows/api/pin", "/flows/api/add"):
            response = client.post(
                path, data=body, content_type="application/json", HTTP_X_FLOWPINS_TOKEN=t["a2"]
            )
            assert response.status_code == 400, (path, body[:10])
            assert "error" in response.json()
    assert PinIntent.objects.count() == 0
