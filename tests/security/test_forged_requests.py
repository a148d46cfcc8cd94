"""Forged install, app and event requests: each is refused, nothing of ours is stored or changed,
and not a byte goes to a server that is not allow-listed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from b24app.models import Portal
from tests.helpers import install, launch, open_page, post_frame, sb, state
from tests.security.conftest import Recorder, stored_state

pytestmark = pytest.mark.django_db(transaction=True)

FORGED = "forged0token0000000000000000000000"
UNKNOWN_MEMBER = hashlib.md5(b"gamma").hexdigest()  # a portal that exists nowhere


@dataclass
class Attack:
    sandbox: Any
    settings: Any
    attacker: Recorder
    client: Client

    def frame(self, path: str, portal: str = "alpha", user_id: int = 2, **form: str) -> Any:
        installer = path == "install"
        launched = launch(self.sandbox, portal, 1 if installer else user_id, installer=installer)
        launched["url"] = launched["url"].replace("/b24/install/", f"/b24/{path}/")
        launched["url"] = launched["url"].replace("/b24/app/", f"/b24/{path}/")
        return post_frame(self.client, launched, **form)

    def event(self, name: str, portal: str = "alpha", **auth: str | None) -> Any:
        result = sb(self.sandbox, f"p/{portal}/event", {"event": name, "deliver": False})
        payload = dict(result["deliveries"][0]["payload"])
        for key, value in auth.items():
            if value is None:
                payload.pop(f"auth[{key}]", None)
            else:
                payload[f"auth[{key}]"] = value
        return self.post_form("/b24/events/", urlencode(payload))

    def post_form(self, path: str, body: str | bytes) -> Any:
        return self.client.post(path, data=body, content_type="application/x-www-form-urlencoded")

    def https_only(self) -> None:
        """Production rules: https only; the allow-listed server is the attacker's https URL,
        so a posted http URL of the same host is the only thing that differs."""
        self.settings.B24_ALLOW_HTTP = False
        self.settings.B24_OAUTH_SERVERS = [self.attacker.url.replace("http:", "https:") + "/"]


def _beta_application_token(a: Attack) -> str:
    return str(launch(a.sandbox, "beta", 1, installer=True)["form"]["APPLICATION_TOKEN"])


def _oversized(a: Attack, path: str) -> Any:
    form = dict(launch(a.sandbox, "alpha", 2)["form"])
    form["PLACEMENT_OPTIONS"] = '{"x": "' + "A" * 300_000 + '"}'
    return a.post_form(path, urlencode(form))


def _too_many_fields(a: Attack, path: str) -> Any:
    form = dict(launch(a.sandbox, "alpha", 2)["form"])
    form.update({f"f{i}": "1" for i in range(300)})
    return a.post_form(path, urlencode(form))


def _bad_options(a: Attack) -> Any:
    statuses = {
        a.frame("app", PLACEMENT_OPTIONS=raw).status_code
        for raw in ("{not json", "[1,2]", '"text"', "null", "[" * 9000)
    }
    return statuses.pop() if len(statuses) == 1 else statuses


def _another_app(a: Attack, path: str) -> Any:
    a.settings.B24_CLIENT_ID = "app.someone-else.123"  # the sandbox issues tokens to ours only
    return a.frame(path)


def _event_from_another_app(a: Attack) -> Any:
    a.settings.B24_CLIENT_ID = "app.someone-else.123"
    return a.event("ONAPPUPDATE", application_token="a-new-token-0000000000")


def _http_oauth_server(a: Attack, path: str) -> Any:
    a.https_only()
    return a.frame(path, SERVER_ENDPOINT=f"{a.attacker.url}/rest/")


def _http_oauth_server_event(a: Attack) -> Any:
    a.https_only()
    return a.event(
        "ONAPPINSTALL",
        server_endpoint=f"{a.attacker.url}/rest/",
        access_token=FORGED,
        application_token="a-new-token-0000000000",
    )


Case = Callable[[Attack], Any]
CASES: list[Any] = [
    # --- the installer ---
    pytest.param(lambda a: a.frame("install", AUTH_ID=FORGED), 403, id="install-forged-AUTH_ID"),
    pytest.param(
        lambda a: a.frame("install", SERVER_ENDPOINT=f"{a.attacker.url}/rest/"),
        403,
        id="install-oauth-server-not-allowlisted",
    ),
    pytest.param(lambda a: _http_oauth_server(a, "install"), 403, id="install-http-endpoint"),
    pytest.param(lambda a: _another_app(a, "install"), 403, id="install-another-apps-token"),
    pytest.param(
        lambda a: a.frame("install", member_id=state(a.sandbox, "beta")["member_id"]),
        403,
        id="install-member_id-of-another-portal",
    ),
    pytest.param(
        lambda a: a.frame("install", PLACEMENT_OPTIONS="{not json"), 400, id="install-bad-options"
    ),
    pytest.param(lambda a: _oversized(a, "/b24/install/"), 413, id="install-oversized"),
    pytest.param(
        lambda a: a.post_form("/b24/install/", b"\x00\xff\xfe%%%&&==" * 50),
        400,
        id="install-malformed",
    ),
    # --- the app page ---
    pytest.param(lambda a: a.frame("app", APPLICATION_TOKEN=""), 403, id="app-no-app-token"),
    pytest.param(
        lambda a: a.frame("app", APPLICATION_TOKEN="wrong-token-0000000000"),
        403,
        id="app-wrong-app-token",
    ),
    pytest.param(
        lambda a: a.frame("app", APPLICATION_TOKEN=_beta_application_token(a)),
        403,
        id="app-another-portals-app-token",
    ),
    pytest.param(lambda a: a.frame("app", member_id=UNKNOWN_MEMBER), 403, id="app-unknown-member"),
    pytest.param(
        lambda a: a.frame("app", portal="beta"), 403, id="app-portal-that-never-installed"
    ),
    pytest.param(
        lambda a: a.frame("app", SERVER_ENDPOINT=f"{a.attacker.url}/rest/"),
        403,
        id="app-oauth-server-not-allowlisted",
    ),
    pytest.param(lambda a: _http_oauth_server(a, "app"), 403, id="app-http-endpoint"),
    pytest.param(lambda a: _another_app(a, "app"), 403, id="app-another-apps-token"),
    pytest.param(_bad_options, 400, id="app-bad-PLACEMENT_OPTIONS"),
    pytest.param(lambda a: _oversized(a, "/b24/app/"), 413, id="app-oversized"),
    pytest.param(lambda a: _too_many_fields(a, "/b24/app/"), 400, id="app-too-many-fields"),
    # --- events ---
    pytest.param(
        lambda a: a.event("ONAPPUNINSTALL", application_token="wrong-token-0000000000"),
        403,
        id="event-wrong-app-token",
    ),
    pytest.param(
        lambda a: a.event("ONAPPUNINSTALL", application_token=None), 403, id="event-no-app-token"
    ),
    pytest.param(
        lambda a: a.event("ONAPPUNINSTALL", application_token=_beta_application_token(a)),
        403,
        id="event-another-portals-app-token",
    ),
    pytest.param(
        lambda a: a.event("ONAPPUNINSTALL", member_id=UNKNOWN_MEMBER),
        403,
        id="event-unknown-member",
    ),
    pytest.param(
        lambda a: a.event(
            "ONAPPINSTALL",
            server_endpoint=f"{a.attacker.url}/rest/",
            access_token=FORGED,
            application_token="a-new-token-0000000000",
        ),
        403,
        id="event-oauth-server-not-allowlisted",
    ),
    pytest.param(_http_oauth_server_event, 403, id="event-http-endpoint"),
    pytest.param(
        lambda a: a.event("ONAPPINSTALL", access_token=FORGED, application_token="x" * 32),
        403,
        id="event-forged-access-token",
    ),
    pytest.param(_event_from_another_app, 403, id="event-another-apps-token"),
    pytest.param(
        lambda a: a.post_form("/b24/events/", "event=ONAPPUNINSTALL&" + "x=" + "A" * 300_000),
        413,
        id="event-oversized",
    ),
    pytest.param(
        lambda a: a.client.post(
            "/b24/events/", data={"event": "ONAPPUNINSTALL"}, content_type="application/json"
        ),
        400,
        id="event-not-form-encoded",
    ),
    pytest.param(
        lambda a: a.post_form("/b24/events/", b"\xff\xfe\x00event[=]&auth[[[=" * 20),
        400,
        id="event-malformed",
    ),
]


@pytest.mark.parametrize(("attack", "status"), CASES)
def test_a_forged_request_is_refused_and_changes_nothing(
    sandbox: Any, settings: Any, attacker: Recorder, attack: Case, status: int
) -> None:
    client = Client()
    install(client, sandbox)
    open_page(client, sandbox, 2)
    before, calls = stored_state(), _portal_calls(sandbox)

    response = attack(Attack(sandbox, settings, attacker, client))

    got = response if isinstance(response, int | set) else response.status_code
    assert got == status, getattr(response, "content", b"")[:300]
    assert stored_state() == before
    assert _portal_calls(sandbox) == calls  # no REST call with anybody's token
    assert attacker.requests == []  # not even a "who are you?" went to an untrusted server


def _portal_calls(sandbox: Any) -> list[int]:
    return [state(sandbox, name)["counters"]["requests"] for name in ("alpha", "beta")]


def test_a_replayed_uninstall_is_refused_after_a_reinstall(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    old = sb(sandbox, "p/alpha/event", {"event": "ONAPPUNINSTALL", "deliver": False})
    payload = urlencode(old["deliveries"][0]["payload"])
    genuine = client.post(
        "/b24/events/", data=payload, content_type="application/x-www-form-urlencoded"
    )
    assert genuine.status_code == 200 and Portal.objects.get().state == "uninstalled"
    install(client, sandbox)  # the admin installs again: a new application_token
    before = stored_state()
    assert Portal.objects.get().application_token == state(sandbox)["application_token"]

    replay = client.post(
        "/b24/events/", data=payload, content_type="application/x-www-form-urlencoded"
    )

    assert replay.status_code == 403
    assert stored_state() == before
    assert Portal.objects.get().state == "active"
