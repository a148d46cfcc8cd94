"""With B24_ALLOW_HTTP off (production), plain http and private hosts are refused even where the
allow-list would let them through: an http OAuth server an operator listed, and a portal
address that the (allow-listed, https, public) OAuth server itself vouches for. Each case gets
past the allow-list, so the https rule is what refuses it, in words, with nothing stored."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from tests.helpers import frame_path, install, launch, sb
from tests.security.conftest import stored_state
from tests.security.publicnet import OAUTH_ADDRESS, OAUTH_BASE, PublicNet

pytestmark = pytest.mark.django_db(transaction=True)

FORM = "application/x-www-form-urlencoded"


def refused(response: Any, status: int, words: str) -> None:
    body = response.content.decode()
    assert response.status_code == status, body[:300]
    assert body.strip() == words, body[:300]


# --- an http OAuth server on the allow-list ---------------------------------------------------


def _install(client: Client, sandbox: Any) -> Any:
    launched = launch(sandbox, "alpha", 1, installer=True)
    return lambda: client.post(frame_path(launched), data=launched["form"])


def _app(client: Client, sandbox: Any) -> Any:
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)
    return lambda: client.post(frame_path(launched), data=launched["form"])


def _event(client: Client, sandbox: Any) -> Any:
    install(client, sandbox)
    # An update as an admin's own frame could send it: their fresh tokens, the current
    # application_token (the sandbox changes nothing for a forged event).
    sent = sb(sandbox, "p/alpha/event", {"event": "ONAPPUPDATE", "forge": True, "deliver": False})
    payload = urlencode(sent["deliveries"][0]["payload"])
    return lambda: client.post("/b24/events/", data=payload, content_type=FORM)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(_install, id="install"),
        pytest.param(_app, id="app"),
        pytest.param(_event, id="event"),
    ],
)
def test_an_http_oauth_server_on_the_allow_list_is_refused_without_leave_for_http(
    sandbox: Any, settings: Any, entry: Any
) -> None:
    """The sandbox (http) is the allow-listed OAuth server and the request is genuine: only
    B24_ALLOW_HTTP being off refuses it."""
    client = Client()
    send = entry(client, sandbox)
    assert settings.B24_OAUTH_SERVERS == [f"{sandbox.url}/"]  # the posted server, exactly
    before = stored_state()

    settings.B24_ALLOW_HTTP = False
    refused(send(), 403, "Refused: the OAuth server must use https.")
    assert stored_state() == before

    settings.B24_ALLOW_HTTP = True  # the sandbox's leave: the very same request is accepted
    assert send().status_code == 200


# --- a portal address the OAuth server vouches for --------------------------------------------

MEMBER_ID = hashlib.md5(b"public-portal").hexdigest()


def fresh_token() -> str:
    """A new access token for every request: the app keeps what the OAuth server said of a
    token for a while (in this process too), and each test's server says something else."""
    return secrets.token_hex(16)


def _frame(path: str) -> Any:
    return lambda client: client.post(f"{path}?DOMAIN=portal.example&LANG=en", data=_form())


def _form() -> dict[str, str]:
    return {
        "AUTH_ID": fresh_token(),
        "AUTH_EXPIRES": "3600",
        "REFRESH_ID": "r" * 32,
        "SERVER_ENDPOINT": f"{OAUTH_BASE}rest/",
        "member_id": MEMBER_ID,
        "APPLICATION_TOKEN": "t" * 32,
        "PLACEMENT": "DEFAULT",
    }


def _install_event(client: Client) -> Any:
    payload = {
        "event": "ONAPPINSTALL",
        "auth[access_token]": fresh_token(),
        "auth[server_endpoint]": f"{OAUTH_BASE}rest/",
        "auth[member_id]": MEMBER_ID,
        "auth[application_token]": "t" * 32,
    }
    return client.post("/b24/events/", data=urlencode(payload), content_type=FORM)


ENTRIES = [
    pytest.param(_frame("/b24/install/"), id="install"),
    pytest.param(_frame("/b24/app/"), id="app"),
    pytest.param(_install_event, id="event"),
]
PORTALS = [
    pytest.param("http://93.184.216.35/rest/", "must use https", id="http-portal"),
    pytest.param(
        "https://127.0.0.2/rest/", "is not on a public internet host", id="loopback-portal"
    ),
    pytest.param("https://10.0.0.7/rest/", "is not on a public internet host", id="private-portal"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("client_endpoint", "words"), PORTALS)
def test_a_portal_address_the_oauth_server_vouches_for_must_be_https_and_public(
    public_net: PublicNet, entry: Any, client_endpoint: str, words: str
) -> None:
    public_net.oauth.install = {"member_id": MEMBER_ID, "client_endpoint": client_endpoint}
    before = stored_state()

    refused(entry(Client()), 403, f"Refused: the portal endpoint {words}.")

    assert public_net.oauth.asked == ["/rest/app.info"]  # past the allow-list, and asked
    assert public_net.destinations() == [f"{OAUTH_ADDRESS}:443"]  # the portal: never
    assert stored_state() == before


def test_a_public_https_portal_passes_the_same_check(public_net: PublicNet) -> None:
    """The counterpart: the same install vouched for with a public https portal goes on to
    ask that portal whether the installer is an admin (it is not there: 503, nothing stored)."""
    public_net.oauth.install = {
        "member_id": MEMBER_ID,
        "client_endpoint": "https://93.184.216.35/rest/",
    }
    before = stored_state()

    refused(
        _frame("/b24/install/")(Client()),
        503,
        "Bitrix24 did not answer whether you are an administrator; try again shortly.",
    )

    assert public_net.destinations() == [f"{OAUTH_ADDRESS}:443", "93.184.216.35:443"]
    assert stored_state() == before
