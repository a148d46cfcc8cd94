"""Install, reinstall and forged installs, against the simulated portal over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client

from b24app.models import Portal, PortalUser
from tests.helpers import install, launch, post_frame, state

pytestmark = pytest.mark.django_db(transaction=True)


def test_install_end_to_end_stores_the_verified_portal_and_binds_handlers(sandbox: Any) -> None:
    client = Client()
    response = install(client, sandbox)
    body = response.content.decode()
    assert "installFinish" in body and 'data-ok="1"' in body
    csp = response["Content-Security-Policy"]
    truth = state(sandbox)
    portal = Portal.objects.get()
    assert portal.member_id == truth["member_id"]
    assert portal.domain == truth["domain"]
    assert portal.client_endpoint == truth["client_endpoint"]
    assert f"frame-ancestors 'self' {portal.origin}" in csp
    assert "X-Frame-Options" not in response
    assert portal.application_token == truth["application_token"]
    admin = PortalUser.objects.get(portal=portal)
    assert admin.user_id == 1 and admin.is_admin and admin.has_tokens
    placements = [(p["placement"], p["handler"]) for p in truth["placements"]]
    assert placements == [("LEFT_MENU", "http://127.0.0.1:8000/b24/app/")]
    events = sorted((e["event"], e["handler"]) for e in truth["events"])
    assert events == [
        ("ONAPPUNINSTALL", "http://127.0.0.1:8000/b24/events/"),
        ("ONAPPUPDATE", "http://127.0.0.1:8000/b24/events/"),
    ]


def test_reinstall_replaces_tokens_and_never_duplicates(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    first = PortalUser.objects.get()
    first_version = first.token_version
    install(client, sandbox)
    assert Portal.objects.count() == 1
    assert PortalUser.objects.count() == 1
    assert PortalUser.objects.get().token_version > first_version
    truth = state(sandbox)
    assert len(truth["placements"]) == 1
    assert len(truth["events"]) == 2


def test_the_posted_domain_is_never_trusted(sandbox: Any) -> None:
    launched = launch(sandbox, "alpha", 1, installer=True)
    launched["url"] = launched["url"].replace("DOMAIN=", "DOMAIN=evil.example.com&X=")
    response = post_frame(Client(), launched)
    assert response.status_code == 200
    assert Portal.objects.get().domain == state(sandbox)["domain"]


def _nothing_stored() -> None:
    assert Portal.objects.count() == 0
    assert PortalUser.objects.count() == 0


@pytest.mark.parametrize(
    ("overrides", "status", "words"),
    [
        ({"SERVER_ENDPOINT": "https://oauth.evil.example/rest/"}, 403, "not in B24_OAUTH_SERVERS"),
        ({"member_id": "0123456789abcdef0123456789abcdef"}, 403, "portal id does not match"),
        ({"AUTH_ID": "forged-token-000000"}, 403, "did not confirm"),
        ({"AUTH_ID": ""}, 400, "missing AUTH_ID"),
        ({"member_id": ""}, 400, "missing member_id"),
        ({"SERVER_ENDPOINT": ""}, 400, "missing SERVER_ENDPOINT"),
        ({"AUTH_ID": "<script>x</script>"}, 400, "malformed"),
        ({"PLACEMENT_OPTIONS": "{not json"}, 400, "not valid JSON"),
        ({"PLACEMENT_OPTIONS": "[1,2]"}, 400, "JSON object"),
        ({"AUTH_EXPIRES": "soon"}, 400, "AUTH_EXPIRES"),
    ],
)
def test_forged_and_malformed_installs_are_refused_with_nothing_stored(
    sandbox: Any, overrides: dict[str, str], status: int, words: str
) -> None:
    launched = launch(sandbox, "alpha", 1, installer=True)
    response = post_frame(Client(), launched, **overrides)
    assert response.status_code == status
    assert words in response.content.decode()
    _nothing_stored()
    assert state(sandbox)["placements"] == []


def test_http_oauth_server_is_refused_without_allow_http(sandbox: Any, settings: Any) -> None:
    settings.B24_ALLOW_HTTP = False
    response = post_frame(Client(), launch(sandbox, "alpha", 1, installer=True))
    assert response.status_code == 403
    assert "https" in response.content.decode()
    _nothing_stored()


def test_a_token_of_another_application_is_refused(sandbox: Any, settings: Any) -> None:
    settings.B24_CLIENT_ID = "app.someone-else.123"  # the sandbox issued tokens to our app only
    response = post_frame(Client(), launch(sandbox, "alpha", 1, installer=True))
    assert response.status_code == 403
    assert "another application" in response.content.decode()
    _nothing_stored()


def test_empty_placement_options_as_php_encodes_them_are_accepted(sandbox: Any) -> None:
    response = post_frame(
        Client(), launch(sandbox, "alpha", 1, installer=True), PLACEMENT_OPTIONS="[]"
    )
    assert response.status_code == 200
    assert Portal.objects.count() == 1


def test_garbage_bodies_are_refused(sandbox: Any) -> None:
    client = Client()
    assert (
        client.post(
            "/b24/install/", data=b"\x00\xff" * 100, content_type="application/octet-stream"
        ).status_code
        == 400
    )
    assert client.post("/b24/install/", data={"x": "1"}).status_code == 400
    huge = {"member_id": "a" * 70, "AUTH_ID": "b" * 20, "SERVER_ENDPOINT": "https://x/"}
    assert client.post("/b24/install/", data=huge).status_code == 400
    _nothing_stored()


def test_handler_urls_answer_the_vendor_console_head_check() -> None:
    client = Client()
    for path in ("/b24/install/", "/b24/app/", "/b24/events/"):
        assert client.head(path).status_code == 200
        assert client.get(path).status_code == 200


def test_app_page_refuses_a_wrong_application_token(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    before = list(PortalUser.objects.values_list("user_id", "token_version"))
    launched = launch(sandbox, "alpha", 2)
    response = post_frame(client, launched, APPLICATION_TOKEN="wrong-token-value")
    assert response.status_code == 403
    assert "application token does not match" in response.content.decode()
    assert list(PortalUser.objects.values_list("user_id", "token_version")) == before


def test_app_page_before_install_says_so_and_stores_nothing(sandbox: Any) -> None:
    response = post_frame(Client(), launch(sandbox, "alpha", 2))
    assert response.status_code == 403
    assert "not installed" in response.content.decode()
    _nothing_stored()


def test_each_user_keeps_their_own_tokens(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    for user_id in (2, 3):
        response = post_frame(client, launch(sandbox, "alpha", user_id))
        assert response.status_code == 200, response.content[:300]
    users = {u.user_id: u for u in PortalUser.objects.all()}
    assert set(users) == {1, 2, 3}
    assert len({u.access_token for u in users.values()}) == 3
    with connection.cursor() as cursor:
        cursor.execute("SELECT access_token FROM b24app_portaluser")
        raw = " ".join(r[0] for r in cursor.fetchall())
    assert all(u.access_token not in raw for u in users.values())
