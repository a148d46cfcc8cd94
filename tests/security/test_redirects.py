"""A portal's REST answering with a redirect: the client follows one, and only to the address
Bitrix24's OAuth server confirms for that portal, on a host the rules allow. Otherwise the call
fails with a typed error, nothing is stored, and no token reaches the other host."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from b24app import tokens
from b24app.bitrix.errors import BadRequest
from b24app.models import Portal, PortalUser, RestCall
from tests.helpers import install, sb, state
from tests.security.conftest import Recorder, stored_state

pytestmark = pytest.mark.django_db(transaction=True)


def ask_as_admin(sandbox: Any, portal: str = "alpha") -> Any:
    """Ask the portal, with its admin's stored token, whether they are an admin."""
    member_id = state(sandbox, portal)["member_id"]
    admin = PortalUser.objects.get(user_id=1, portal__member_id=member_id)
    return tokens.call_with_user(
        admin, lambda client, token: client.call("user.admin", token=token)
    )


def redirects(sandbox: Any, portal: str) -> int:
    return int(state(sandbox, portal)["counters"]["http_status"].get("302", 0))


def test_a_renamed_portal_redirecting_again_is_not_followed_a_second_time(sandbox: Any) -> None:
    install(Client(), sandbox)
    sb(sandbox, "p/alpha/rename", {"new_name": "alpha2"})
    moved_to = state(sandbox, "alpha2")["client_endpoint"]
    # The new address, which Bitrix24 confirms, redirects once more (to itself: a loop).
    sb(sandbox, "config", {"portal": "alpha2", "rest_redirect": moved_to})

    with pytest.raises(BadRequest) as refused:
        ask_as_admin(sandbox, "alpha2")

    assert refused.value.code == "HTTP_302"  # the second redirect is an answer, not followed
    assert redirects(sandbox, "alpha2") == 1  # one request reached the new address, no more
    calls = list(RestCall.objects.order_by("pk").values_list("method", "error"))
    assert calls[-2:] == [("user.admin", "MOVED"), ("user.admin", "HTTP_302")]
    assert Portal.objects.get().client_endpoint == moved_to  # the confirmed move is kept


@pytest.mark.parametrize(
    ("scheme", "words"),
    [
        ("http", "the portal endpoint must use https"),
        ("https", "the portal endpoint is not on a public internet host"),
    ],
    ids=["plain-http", "https-loopback"],
)
def test_with_http_disallowed_a_redirect_to_a_plain_or_private_host_is_not_followed(
    sandbox: Any, settings: Any, attacker: Recorder, scheme: str, words: str
) -> None:
    """Production rules (B24_ALLOW_HTTP off): the new address is refused before the OAuth
    server is even asked about it, and before our token goes anywhere near it."""
    install(Client(), sandbox)
    away = attacker.url.replace("http:", f"{scheme}:") + "/rest/"
    sb(sandbox, "config", {"portal": "alpha", "rest_redirect": away})
    settings.B24_ALLOW_HTTP = False
    before = stored_state()

    with pytest.raises(BadRequest) as refused:
        ask_as_admin(sandbox)

    assert refused.value.code == "BAD_REDIRECT"
    assert refused.value.description == f"not followed: {words}"
    assert redirects(sandbox, "alpha") == 1
    assert attacker.requests == []  # no token, no request at all
    assert stored_state() == before


def test_a_redirect_to_another_portal_is_not_followed(sandbox: Any) -> None:
    """Both portals are genuine and allowed hosts, but Bitrix24 names alpha's own address for
    alpha: beta's host never sees alpha's token."""
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    sb(
        sandbox,
        "config",
        {"portal": "alpha", "rest_redirect": state(sandbox, "beta")["client_endpoint"]},
    )
    before, beta_calls = stored_state(), state(sandbox, "beta")["counters"]["requests"]

    with pytest.raises(BadRequest, match="does not confirm"):
        ask_as_admin(sandbox)

    assert state(sandbox, "beta")["counters"]["requests"] == beta_calls
    assert stored_state() == before
