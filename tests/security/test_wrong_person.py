"""Attacks with *valid* credentials of the wrong person: an ordinary user of the portal (who holds
their own tokens and, like everyone who opened the app, the portal's application_token), or a
user who owns another portal. Each attack is refused with a 4xx in words and changes nothing;
the genuine path beside it still works."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from b24app import tokens
from b24app.bitrix.errors import BadRequest, ReopenRequired
from b24app.models import Portal, PortalUser
from tests.helpers import install, launch, post_frame, sb, settle_background_work, state
from tests.security.conftest import stored_state

pytestmark = pytest.mark.django_db(transaction=True)

ORDINARY = 2  # a user of the portal without admin rights (the sandbox's user 2)


def post_event(path: str, payload: dict[str, str]) -> Any:
    return Client().post(
        path, data=urlencode(payload), content_type="application/x-www-form-urlencoded"
    )


def self_made_event(
    event: str, launched: dict[str, Any], *, application_token: str, **data: str
) -> dict[str, str]:
    """An event as a user builds it from their own frame POST: their token, the portal's ids."""
    form = launched["form"]
    payload = {
        "event": event,
        "event_handler_id": "1",
        "ts": "1700000000",
        "auth[access_token]": form["AUTH_ID"],
        "auth[refresh_token]": form["REFRESH_ID"],
        "auth[expires_in]": "3600",
        "auth[server_endpoint]": form["SERVER_ENDPOINT"],
        "auth[member_id]": form["member_id"],
        "auth[user_id]": "1",  # claims to be the admin; only the OAuth server's word counts
        "auth[application_token]": application_token,
    }
    payload.update({f"data[{k}]": v for k, v in data.items()})
    return payload


def without_token_values(snapshot: Any) -> Any:
    portals, users, *rest = snapshot
    return portals, [(u[0], u[1], u[2], u[6]) for u in users], *rest


def refused(response: Any, status: int, words: str) -> None:
    body = response.content.decode()
    assert response.status_code == status, body[:300]
    assert words in body, body[:300]


# --- 1. install takeover ----------------------------------------------------------------------


@pytest.mark.parametrize("application_token", ["real", "made-up-application-token"])
def test_an_ordinary_user_cannot_install_over_the_admin(
    sandbox: Any, application_token: str
) -> None:
    client = Client()
    install(client, sandbox)
    before = stored_state()
    attack = launch(sandbox, "alpha", ORDINARY, installer=True)
    token = (
        attack["form"]["APPLICATION_TOKEN"] if application_token == "real" else application_token
    )
    refused(post_frame(client, attack, APPLICATION_TOKEN=token), 403, "Only an administrator")
    assert stored_state() == before
    # The genuine users are not locked out, and the admin's reinstall still works.
    assert post_frame(client, launch(sandbox, "alpha", 1)).status_code == 200
    assert post_frame(client, launch(sandbox, "alpha", ORDINARY)).status_code == 200
    install(client, sandbox)
    assert Portal.objects.get().installer_user_id == 1


def test_an_ordinary_user_cannot_install_on_a_fresh_portal(sandbox: Any) -> None:
    response = post_frame(Client(), launch(sandbox, "alpha", ORDINARY, installer=True))
    refused(response, 403, "Only an administrator")
    assert Portal.objects.count() == 0 and PortalUser.objects.count() == 0
    assert state(sandbox)["placements"] == []


@pytest.mark.parametrize(
    ("event", "application_token"),
    [
        ("ONAPPINSTALL", "real"),  # would make the user the installer
        ("ONAPPINSTALL", "made-up-application-token"),
        ("ONAPPUPDATE", "made-up-application-token"),  # would replace the stored token
    ],
)
def test_a_self_made_install_or_update_event_with_a_users_own_token_is_refused(
    sandbox: Any, event: str, application_token: str
) -> None:
    client = Client()
    install(client, sandbox)
    attack = launch(sandbox, "alpha", ORDINARY)
    real = attack["form"]["APPLICATION_TOKEN"]
    token = real if application_token == "real" else application_token
    before = stored_state()
    payload = self_made_event(event, attack, application_token=token)
    refused(post_event("/b24/events/", payload), 403, "Only an administrator")
    assert stored_state() == before
    assert post_frame(client, launch(sandbox, "alpha", 1)).status_code == 200


def test_an_update_event_stores_tokens_for_their_real_owner_only(sandbox: Any) -> None:
    install(Client(), sandbox)
    admin_before = PortalUser.objects.get(user_id=1)
    attack = launch(sandbox, "alpha", ORDINARY)
    payload = self_made_event(
        "ONAPPUPDATE", attack, application_token=attack["form"]["APPLICATION_TOKEN"]
    )
    assert post_event("/b24/events/", payload).status_code == 200
    admin = PortalUser.objects.get(user_id=1)
    assert (admin.access_token, admin.token_version) == (
        admin_before.access_token,
        admin_before.token_version,
    )
    assert PortalUser.objects.get(user_id=ORDINARY).access_token == attack["form"]["AUTH_ID"]
    portal = Portal.objects.get()
    assert portal.installer_user_id == 1
    assert portal.application_token == attack["form"]["APPLICATION_TOKEN"]


def test_the_genuine_update_with_a_new_application_token_is_taken(
    sandbox: Any, live_server: Any
) -> None:
    sandbox.state.app_url = live_server.url
    install(Client(), sandbox)
    old = Portal.objects.get().application_token
    delivery = sb(
        sandbox,
        "p/alpha/event",
        {
            "event": "ONAPPUPDATE",
            "rotate_application_token": True,
            "handler": f"{live_server.url}/b24/events/",
        },
    )["deliveries"][0]
    assert delivery["status"] == 200, delivery["body"]
    portal = Portal.objects.get()
    assert portal.application_token != old
    assert portal.application_token == state(sandbox)["application_token"]


# --- 2. uninstall by anyone -------------------------------------------------------------------


@pytest.mark.parametrize("expired", [False, True], ids=["live-tokens", "expired-tokens"])
def test_a_self_made_uninstall_with_the_real_application_token_deletes_nothing(
    sandbox: Any, expired: bool
) -> None:
    client = Client()
    install(client, sandbox)
    attack = launch(sandbox, "alpha", ORDINARY)
    assert post_frame(client, attack).status_code == 200
    if expired:  # the stored access tokens have lapsed: the check must refresh to ask
        sb(sandbox, "p/alpha/expire", {})
        PortalUser.objects.update(expires_at=None)
    before = stored_state()
    payload = {
        "event": "ONAPPUNINSTALL",
        "auth[member_id]": attack["form"]["member_id"],
        "auth[application_token]": attack["form"]["APPLICATION_TOKEN"],
        "data[CLEAN]": "1",
    }
    refused(post_event("/b24/events/", payload), 403, "uninstall not confirmed by Bitrix24")
    after = stored_state()
    if expired:  # asking Bitrix24 refreshed the chain it used; nothing else moved
        assert without_token_values(after) == without_token_values(before)
    else:
        assert after == before
    assert Portal.objects.get().state == Portal.State.ACTIVE
    assert post_frame(client, launch(sandbox, "alpha", 1)).status_code == 200


def test_the_genuine_uninstall_with_clean_deletes_tokens_and_data(
    sandbox: Any, live_server: Any
) -> None:
    sandbox.state.app_url = live_server.url
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", ORDINARY)).status_code == 200
    delivery = sb(
        sandbox,
        "p/alpha/event",
        {"event": "ONAPPUNINSTALL", "clean": 1, "handler": f"{live_server.url}/b24/events/"},
    )["deliveries"][0]
    assert delivery["status"] == 200, delivery["body"]
    assert Portal.objects.count() == 0 and PortalUser.objects.count() == 0


def test_an_uninstall_that_cannot_be_checked_now_is_confirmed_later_not_guessed(
    sandbox: Any, settings: Any
) -> None:
    install(Client(), sandbox)
    dead = "http://127.0.0.1:1/"  # allow-listed, but nothing answers there
    settings.B24_OAUTH_SERVERS = [*settings.B24_OAUTH_SERVERS, dead]
    Portal.objects.update(server_endpoint=dead + "rest/")
    before = stored_state()
    payload = {
        "event": "ONAPPUNINSTALL",
        "auth[member_id]": state(sandbox)["member_id"],
        "auth[application_token]": state(sandbox)["application_token"],
        "data[CLEAN]": "1",
    }
    response = post_event("/b24/events/", payload)
    assert response.status_code == 202
    assert "confirmed with it in the background" in response.content.decode()
    assert stored_state() == before


# --- 3. endpoint hijack through a refresh ---------------------------------------------------


def test_a_refresh_token_from_another_portal_is_refused_and_moves_nothing(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    alpha_endpoint = Portal.objects.get().client_endpoint
    theirs = launch(sandbox, "beta", 1)  # the attacker administers a portal of their own
    attack = launch(sandbox, "alpha", ORDINARY)
    response = post_frame(client, attack, REFRESH_ID=theirs["form"]["REFRESH_ID"], AUTH_EXPIRES="0")
    assert response.status_code == 200  # the page renders; the refresh behind it is refused
    # The cold open queued a list fetch, which refreshes too: let it finish first, or the two
    # refreshes race for the one-use refresh token and the loser reads "invalid_grant".
    settle_background_work()
    user = PortalUser.objects.get(user_id=ORDINARY)
    with pytest.raises(ReopenRequired, match="another portal"):
        tokens.call_with_user(user, lambda c, t: c.call("user.current", token=t))
    user.refresh_from_db()
    assert user.state == PortalUser.State.NEEDS_REOPEN and not user.has_tokens
    portal = Portal.objects.get()
    assert portal.client_endpoint == alpha_endpoint
    # The admin's calls still go to alpha and nowhere else.
    beta_calls = state(sandbox, "beta")["counters"]
    admin = PortalUser.objects.get(user_id=1)
    assert tokens.call_with_user(admin, lambda c, t: c.call("user.admin", token=t).result)
    assert state(sandbox, "beta")["counters"] == beta_calls


def test_a_refresh_answer_for_another_user_is_refused(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    someone_else = launch(sandbox, "alpha", 3)
    attack = launch(sandbox, "alpha", ORDINARY)
    post_frame(client, attack, REFRESH_ID=someone_else["form"]["REFRESH_ID"], AUTH_EXPIRES="0")
    settle_background_work()  # as above: one refresh at a time
    user = PortalUser.objects.get(user_id=ORDINARY)
    with pytest.raises(ReopenRequired, match="another user"):
        tokens.call_with_user(user, lambda c, t: c.call("user.current", token=t))
    assert not PortalUser.objects.filter(user_id=3).exists()


# --- 7. events at the installer URL -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/b24/install/", "/b24/events/"])
def test_onappuserready_is_answered_and_changes_nothing(sandbox: Any, path: str) -> None:
    install(Client(), sandbox)
    opened = launch(sandbox, "alpha", ORDINARY)
    before = stored_state()
    payload = self_made_event(
        "ONAPPUSERREADY", opened, application_token=opened["form"]["APPLICATION_TOKEN"]
    )
    response = post_event(path, payload)
    assert response.status_code == 200, response.content[:300]
    assert stored_state() == before


# --- 8. endpoint hosts and redirects --------------------------------------------------------


def test_a_redirect_bitrix24_does_not_confirm_is_not_followed(sandbox: Any, attacker: Any) -> None:
    """A portal answering 302 to another host gets no token there unless the OAuth server names
    that host as the portal's address."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(302)
            self.send_header("Location", f"{attacker.url}/rest/{self.path.rsplit('/', 1)[-1]}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        install(Client(), sandbox)
        moved = f"http://127.0.0.1:{server.server_address[1]}/rest/"
        Portal.objects.update(client_endpoint=moved)
        admin = PortalUser.objects.get(user_id=1)
        with pytest.raises(BadRequest, match="does not confirm"):
            tokens.call_with_user(admin, lambda c, t: c.call("user.admin", token=t))
    finally:
        server.shutdown()
        server.server_close()
    assert attacker.requests == []
    assert Portal.objects.get().client_endpoint == moved


# --- 5. renames: the frame follows the host -------------------------------------------------


def frame_ancestors(response: Any) -> set[str]:
    policy = response["Content-Security-Policy"]
    directive = next(d for d in policy.split(";") if d.strip().startswith("frame-ancestors"))
    return set(directive.split()[1:])


def test_after_a_rename_the_next_open_is_framed_by_the_new_host_only(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    old_origin = sandbox.origin("alpha")
    assert frame_ancestors(post_frame(client, launch(sandbox, "alpha", 2))) == {
        "'self'",
        old_origin,
    }
    sb(sandbox, "p/alpha/rename", {"new_name": "alpha2"})
    new_origin = sandbox.origin("alpha2")
    assert new_origin != old_origin  # Bitrix24 renames change the host
    response = post_frame(client, launch(sandbox, "alpha2", 2))
    assert response.status_code == 200
    assert frame_ancestors(response) == {"'self'", new_origin}  # no REST 302 needed first
    assert Portal.objects.get().client_endpoint == state(sandbox, "alpha2")["client_endpoint"]


def test_a_cached_verification_yields_to_a_frame_parent_that_disagrees(sandbox: Any) -> None:
    """The same token opened again right after a rename: its cached app.info still names the
    old host, but the browser's Origin (the new portal page) makes the app ask Bitrix24 again.
    The header alone decides nothing: a made-up Origin changes no stored address."""
    client = Client()
    install(client, sandbox)
    opened = launch(sandbox, "alpha", 2)
    assert post_frame(client, opened).status_code == 200
    before = Portal.objects.get().client_endpoint
    made_up = client.post(
        f"{opened['action']}?{urlencode(opened['query'])}",
        data=opened["form"],
        HTTP_ORIGIN="https://evil.example",
    )
    assert made_up.status_code == 200
    assert Portal.objects.get().client_endpoint == before
    assert "https://evil.example" not in frame_ancestors(made_up)
    sb(sandbox, "p/alpha/rename", {"new_name": "alpha2"})
    reopened = client.post(
        f"{opened['action']}?{urlencode(opened['query'])}",
        data=opened["form"],
        HTTP_ORIGIN=sandbox.origin("alpha2"),
    )
    assert reopened.status_code == 200
    assert frame_ancestors(reopened) == {"'self'", sandbox.origin("alpha2")}
    assert Portal.objects.get().client_endpoint == state(sandbox, "alpha2")["client_endpoint"]


# --- events as the sandbox delivers them ----------------------------------------------------


def test_the_sandbox_delivers_onappuserready_to_the_installer_url_and_nothing_changes(
    sandbox: Any, live_server: Any
) -> None:
    sandbox.state.app_url = live_server.url
    install(Client(), sandbox)
    before = stored_state()
    result = sb(sandbox, "p/alpha/event", {"event": "ONAPPUSERREADY", "user_id": ORDINARY})
    (delivery,) = result["deliveries"]
    assert delivery["handler"] == f"{live_server.url}/b24/install/"
    assert delivery["status"] == 200, delivery["body"]
    assert stored_state() == before


@pytest.mark.parametrize(
    ("event", "extra", "status", "words"),
    [
        ("ONAPPUNINSTALL", {"clean": 1}, 403, "uninstall not confirmed by Bitrix24"),
        ("ONAPPINSTALL", {}, 403, "Only an administrator"),
        ("ONAPPUPDATE", {"application_token": "a-new-token-0001"}, 403, "Only an administrator"),
    ],
)
def test_events_the_portal_did_not_emit_are_refused(
    sandbox: Any, live_server: Any, event: str, extra: dict[str, Any], status: int, words: str
) -> None:
    sandbox.state.app_url = live_server.url
    install(Client(), sandbox)
    before = stored_state()
    result = sb(
        sandbox,
        "p/alpha/event",
        {
            "event": event,
            "forge": True,
            "user_id": ORDINARY,
            "handler": f"{live_server.url}/b24/events/",
            **extra,
        },
    )
    (delivery,) = result["deliveries"]
    assert delivery["status"] == status and words in delivery["body"], delivery["body"]
    assert stored_state() == before


# --- valid credentials of another portal ----------------------------------------------------


@pytest.mark.parametrize("event", ["ONAPPINSTALL", "ONAPPUPDATE"])
def test_another_portals_admin_token_cannot_install_or_update_this_portal(
    sandbox: Any, event: str
) -> None:
    client = Client()
    install(client, sandbox)
    before = stored_state()
    theirs = launch(sandbox, "beta", 1)  # an admin — of beta
    payload = self_made_event(event, theirs, application_token="a-new-token-0002")
    payload["auth[member_id]"] = state(sandbox)["member_id"]  # aimed at alpha
    refused(post_event("/b24/events/", payload), 403, "portal id does not match")
    install_attack = launch(sandbox, "beta", 1, installer=True)
    install_attack["form"]["member_id"] = state(sandbox)["member_id"]
    refused(post_frame(client, install_attack), 403, "portal id does not match")
    assert stored_state() == before
