"""ONAPPUSERREADY and forged events (delivered, but the portal's state does not change)."""

from __future__ import annotations

from typing import Any

import requests

from .conftest import Receiver, SandboxClient

USER_READY_KEYS = {
    "event",
    "event_handler_id",
    "data[LANGUAGE_ID]",
    "ts",
    "auth[access_token]",
    "auth[expires_in]",
    "auth[scope]",
    "auth[domain]",
    "auth[server_endpoint]",
    "auth[client_endpoint]",
    "auth[member_id]",
    "auth[user_id]",
    "auth[application_token]",
}


def install_state(sb: SandboxClient, portal: str = "alpha") -> dict[str, Any]:
    state = sb.state(portal)
    keys = ("installed", "application_token", "app_version", "events", "placements", "pins")
    return {k: state[k] for k in keys}


def installed_with_bindings(sb: SandboxClient, receiver: Receiver) -> dict[str, str]:
    """Install alpha, bind ONAPPUNINSTALL and a placement; return live tokens of users 1, 2."""
    sb.control("p/alpha/install_finish", {})
    admin = sb.tokens(user_id=1)
    user = sb.tokens(user_id=2)
    sb.result("event.bind", admin["access_token"], event="ONAPPUNINSTALL", handler=receiver.url)
    sb.result("placement.bind", admin["access_token"], PLACEMENT="LEFT_MENU", HANDLER=receiver.url)
    return {
        "admin": admin["access_token"],
        "user": user["access_token"],
        "refresh": user["refresh_token"],
    }


def test_onappuserready_goes_to_the_installer(sb: SandboxClient, receiver: Receiver) -> None:
    sb.config(app_url=receiver.url)
    sb.control("p/alpha/install_finish", {})
    before = install_state(sb)
    sent = sb.control("p/alpha/event", {"event": "onAppUserReady", "user_id": 2})
    assert [d["handler"] for d in sent["deliveries"]] == [f"{receiver.url}/b24/install/"]
    got = receiver.requests[0]
    assert got.path == "/b24/install/"
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    form = got.form
    assert set(form) == USER_READY_KEYS and "auth[refresh_token]" not in form
    state = sb.state()
    assert form["event"] == "ONAPPUSERREADY" and form["event_handler_id"].isdigit()
    assert form["data[LANGUAGE_ID]"] == "ru" and form["ts"].isdigit()
    assert form["auth[user_id]"] == "2" and form["auth[expires_in]"] == "3600"
    assert form["auth[scope]"] == "task,placement"
    assert form["auth[domain]"] == state["domain"]
    assert form["auth[client_endpoint]"] == state["client_endpoint"]
    assert form["auth[server_endpoint]"] == f"{sb.url}/rest/"
    assert form["auth[member_id]"] == state["member_id"]
    assert form["auth[application_token]"] == before["application_token"] != ""
    assert sb.result("profile", form["auth[access_token]"])["ID"] == "2"  # fresh, user 2's
    assert install_state(sb) == before
    assert state["counters"]["events_sent"] == 1 and state["counters"]["events_forged"] == 0

    elsewhere = sb.control(
        "p/beta/event", {"event": "ONAPPUSERREADY", "user_id": 3, "handler": f"{receiver.url}/x/"}
    )
    assert receiver.requests[1].path == "/x/" and elsewhere["portal"]["installed"] is False
    assert receiver.requests[1].form["auth[application_token]"] == ""  # beta: never installed
    assert sb.state("beta")["installed"] is False


def test_forged_install_and_update_change_nothing(sb: SandboxClient, receiver: Receiver) -> None:
    tokens = installed_with_bindings(sb, receiver)
    before = install_state(sb)
    sent = sb.control(
        "p/alpha/event",
        {"event": "ONAPPINSTALL", "forge": True, "user_id": 2, "handler": f"{receiver.url}/i/"},
    )
    assert sent["forged"] is True and sent["deliveries"][0]["status"] == 200
    form = receiver.requests[0].form
    assert form["event"] == "ONAPPINSTALL" and form["data[VERSION]"] == "1"
    assert form["auth[user_id]"] == "2" and form["auth[refresh_token]"]
    assert form["auth[application_token]"] == before["application_token"]
    assert sb.result("profile", form["auth[access_token]"])["ADMIN"] is False
    assert install_state(sb) == before and sent["portal"]["installed"] is True

    update = sb.control(
        "p/alpha/event",
        {
            "event": "ONAPPUPDATE",
            "forge": True,
            "user_id": 2,
            "version": 7,
            "rotate_application_token": True,  # ignored: a forger rotates nothing
            "application_token": "stolen-or-guessed",
            "handler": f"{receiver.url}/u/",
        },
    )
    form = receiver.requests[1].form
    assert (form["data[VERSION]"], form["data[PREVIOUS_VERSION]"]) == ("7", "1")
    assert form["auth[application_token]"] == "stolen-or-guessed"
    assert update["portal"]["application_token"] == before["application_token"]
    assert install_state(sb) == before  # no version bump, bindings kept
    for token in (tokens["admin"], tokens["user"]):
        assert sb.call("profile", token).status_code == 200
    counters = sb.state()["counters"]
    assert counters["events_forged"] == 2 and counters["events_sent"] == 0


def test_forged_uninstall_revokes_nothing(sb: SandboxClient, receiver: Receiver) -> None:
    tokens = installed_with_bindings(sb, receiver)
    before = install_state(sb)
    sent = sb.control(
        "p/alpha/event", {"event": "ONAPPUNINSTALL", "forge": True, "clean": 1, "user_id": 2}
    )
    assert [d["handler"] for d in sent["deliveries"]] == [receiver.url]  # the bound handler
    form = receiver.requests[0].form
    assert form["event"] == "ONAPPUNINSTALL" and form["data[CLEAN]"] == "1"
    assert form["auth[application_token]"] == before["application_token"]
    assert "auth[access_token]" not in form and "auth[refresh_token]" not in form
    assert install_state(sb) == before
    assert sb.call("profile", tokens["user"]).status_code == 200
    assert sb.refresh(tokens["refresh"]).status_code == 200

    guessed = sb.control(
        "p/alpha/event",
        {"event": "ONAPPUNINSTALL", "forge": True, "application_token": "0" * 32, "clean": 0},
    )
    assert guessed["payload"]["auth[application_token]"] == "0" * 32
    assert guessed["payload"]["data[CLEAN]"] == "0"
    assert install_state(sb) == before
    counters = sb.state()["counters"]
    assert counters["events_forged"] == 2 and counters["events_sent"] == 0


def test_event_control_rejects_bad_requests(sb: SandboxClient) -> None:
    url = f"{sb.url}/_sandbox/p/alpha/event"
    unknown = requests.post(url, json={"event": "ONAPPPAYMENT"}, timeout=10)
    assert unknown.status_code == 400 and "ONAPPUSERREADY" in unknown.json()["error"]
    chosen = requests.post(
        url, json={"event": "ONAPPINSTALL", "application_token": "x", "deliver": False}, timeout=10
    )
    assert chosen.status_code == 400 and "forged" in chosen.json()["error"]
    assert sb.state()["installed"] is False
