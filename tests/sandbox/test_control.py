"""Control API: launch, lifecycle events, rename, reset, knobs, the portal page, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from .conftest import Receiver, SandboxClient

ROOT = Path(__file__).resolve().parents[2]


def test_launch_form_fields(sb: SandboxClient) -> None:
    launched = sb.launch(user_id=2, lang="ru", placement_options={"any": "x/y"})
    url = urlsplit(launched["url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == "http://127.0.0.1:8000/b24/app/"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query["DOMAIN"] == sb.state()["domain"]
    assert query["PROTOCOL"] == "0" and query["LANG"] == "ru" and len(query["APP_SID"]) == 32
    form = launched["form"]
    assert set(form) == {
        "AUTH_ID",
        "AUTH_EXPIRES",
        "REFRESH_ID",
        "SERVER_ENDPOINT",
        "member_id",
        "status",
        "PLACEMENT",
        "PLACEMENT_OPTIONS",
        "APPLICATION_TOKEN",
        "APPLICATION_SCOPE",
    }
    assert form["AUTH_EXPIRES"] == "3600" and form["status"] == "F"
    assert form["SERVER_ENDPOINT"] == f"{sb.url}/rest/"
    assert form["PLACEMENT"] == "DEFAULT" and json.loads(form["PLACEMENT_OPTIONS"]) == {
        "any": "x/y"
    }
    assert form["APPLICATION_TOKEN"] == ""  # not installed yet
    assert form["APPLICATION_SCOPE"] == "task,placement"
    assert sb.result("profile", form["AUTH_ID"])["ID"] == "2"  # tokens belong to the opener

    installer = sb.launch(user_id=1, installer=True)
    assert urlsplit(installer["url"]).path == "/b24/install/"
    app_token = installer["form"]["APPLICATION_TOKEN"]
    assert len(app_token) == 32 and sb.state()["application_token"] == app_token
    assert sb.state()["installed"] is False


def test_placement_launch_needs_binding_and_install(sb: SandboxClient) -> None:
    admin = sb.token()
    blocked = requests.post(
        f"{sb.url}/_sandbox/p/alpha/launch", json={"placement": "TASK_VIEW_TAB"}, timeout=10
    )
    assert blocked.status_code == 409
    handler = "http://127.0.0.1:8000/b24/placement/"
    sb.result("placement.bind", admin, PLACEMENT="TASK_VIEW_TAB", HANDLER=handler)
    sb.control("p/alpha/install_finish", {})
    launched = sb.launch(user_id=3, placement="TASK_VIEW_TAB", placement_options={"taskId": 1007})
    assert launched["action"] == handler
    options = json.loads(launched["form"]["PLACEMENT_OPTIONS"])
    assert options == {"taskId": 1007, "URI": f"{sb.origin()}/p/alpha/"}


def test_onappinstall_delivery_format(sb: SandboxClient, receiver: Receiver) -> None:
    sent = sb.control(
        "p/alpha/event", {"event": "ONAPPINSTALL", "handler": f"{receiver.url}/b24/events/"}
    )
    assert [d["status"] for d in sent["deliveries"]] == [200]
    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    assert got.path == "/b24/events/"
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    form = got.form
    assert form["event"] == "ONAPPINSTALL" and form["event_handler_id"].isdigit()
    assert form["data[VERSION]"] == "1" and form["data[LANGUAGE_ID]"] == "ru"
    state = sb.state()
    assert state["installed"] is True
    expected_auth = {
        "auth[domain]": state["domain"],
        "auth[member_id]": state["member_id"],
        "auth[client_endpoint]": f"{sb.origin()}/p/alpha/rest/",
        "auth[server_endpoint]": f"{sb.url}/rest/",
        "auth[application_token]": state["application_token"],
        "auth[scope]": "task,placement",
        "auth[status]": "F",
        "auth[user_id]": "1",
        "auth[expires_in]": "3600",
    }
    assert {k: form[k] for k in expected_auth} == expected_auth
    assert form["ts"].isdigit() and form["auth[expires]"].isdigit()
    assert sb.result("profile", form["auth[access_token]"])["ADMIN"] is True
    assert sb.refresh(form["auth[refresh_token]"]).status_code == 200
    assert sent["payload"] == form

    reinstall = sb.control(
        "p/alpha/event", {"event": "ONAPPINSTALL", "handler": f"{receiver.url}/again/"}
    )
    new_token = reinstall["payload"]["auth[application_token]"]
    assert new_token != state["application_token"] == form["auth[application_token]"]


def test_onappupdate_drops_bindings_and_can_rotate(sb: SandboxClient, receiver: Receiver) -> None:
    sb.control("p/alpha/install_finish", {})
    admin = sb.token()
    sb.result("event.bind", admin, event="ONAPPUNINSTALL", handler=f"{receiver.url}/unused/")
    before = sb.state()["application_token"]
    sent = sb.control(
        "p/alpha/event",
        {"event": "ONAPPUPDATE", "handler": receiver.url + "/", "rotate_application_token": True},
    )
    form = receiver.requests[0].form
    assert form["event"] == "ONAPPUPDATE"
    assert (form["data[VERSION]"], form["data[PREVIOUS_VERSION]"]) == ("2", "1")
    assert form["auth[application_token]"] != before
    state = sb.state()
    assert state["events"] == [] and state["app_version"] == 2
    assert (
        state["application_token"]
        == form["auth[application_token]"]
        == sent["portal"]["application_token"]
    )


def test_onappuninstall_has_no_tokens_and_revokes(sb: SandboxClient, receiver: Receiver) -> None:
    sb.control("p/alpha/install_finish", {})
    pair = sb.tokens(user_id=2)
    admin = sb.token()
    hook = f"{receiver.url}/b24/events/"
    sb.result("event.bind", admin, event="ONAPPUNINSTALL", handler=hook)
    sb.result("placement.bind", admin, PLACEMENT="LEFT_MENU", HANDLER=hook)
    app_token = sb.state()["application_token"]
    sent = sb.control("p/alpha/event", {"event": "ONAPPUNINSTALL", "clean": 1})
    assert [d["handler"] for d in sent["deliveries"]] == [hook]  # the bound handler
    form = receiver.requests[0].form
    assert form["event"] == "ONAPPUNINSTALL" and form["data[CLEAN]"] == "1"
    assert form["auth[application_token]"] == app_token
    assert not any("token" in k and k != "auth[application_token]" for k in form)
    assert "auth[access_token]" not in form and "auth[refresh_token]" not in form
    revoked = sb.call("profile", pair["access_token"])
    assert revoked.status_code == 401 and revoked.json()["error"] == "NO_AUTH_FOUND"
    assert sb.refresh(pair["refresh_token"]).json()["error"] == "invalid_grant"
    state = sb.state()
    assert state["installed"] is False and state["placements"] == [] and state["events"] == []
    assert state["tokens"]["live_access_tokens"] == 0


def test_event_fallback_and_unreachable_handler(sb: SandboxClient) -> None:
    sent = sb.control("p/beta/event", {"event": "ONAPPINSTALL"})
    delivery = sent["deliveries"][0]
    assert delivery["handler"] == "http://127.0.0.1:8000/b24/events/"
    # nothing listens there in this test: the sandbox reports it instead of failing
    assert delivery["status"] is None or isinstance(delivery["status"], int)
    skipped = sb.control("p/beta/event", {"event": "ONAPPUPDATE", "deliver": False})
    assert skipped["deliveries"][0]["skipped"] is True
    assert skipped["payload"]["data[PREVIOUS_VERSION]"] == "1"


def test_rename_redirects_and_keeps_member_id(sb: SandboxClient) -> None:
    pair = sb.tokens(user_id=2)
    member_id = sb.state()["member_id"]
    old_origin = sb.origin("alpha")
    renamed = sb.control("p/alpha/rename", {"new_name": "alpha2"})
    assert renamed["portal"]["member_id"] == member_id
    new_origin = renamed["portal"]["origin"]
    old = requests.post(
        f"{old_origin}/p/alpha/rest/profile?auth={pair['access_token']}&x=1",
        json={},
        allow_redirects=False,
        timeout=10,
    )
    assert old.status_code == 302
    assert old.headers["Location"] == (
        f"{new_origin}/p/alpha2/rest/profile?auth={pair['access_token']}&x=1"
    )
    assert sb.result("profile", pair["access_token"], portal="alpha2")["ID"] == "2"
    page = requests.get(f"{old_origin}/p/alpha/?user=2", allow_redirects=False, timeout=10)
    assert page.status_code == 302
    assert page.headers["Location"] == f"{new_origin}/p/alpha2/?user=2"
    refreshed = sb.refresh(pair["refresh_token"]).json()
    assert refreshed["client_endpoint"] == f"{new_origin}/p/alpha2/rest/"
    assert refreshed["member_id"] == member_id
    info = requests.get(
        f"{sb.url}/rest/app.info", params={"auth": refreshed["access_token"]}, timeout=10
    ).json()["result"]["install"]
    assert info["domain"] == sb.state("alpha2")["domain"]
    assert info["client_endpoint"] == f"{new_origin}/p/alpha2/rest/"
    assert sb.launch(user_id=1)["query"]["DOMAIN"] == info["domain"]


def test_reset_config_and_pins_control(sb: SandboxClient) -> None:
    pinned = sb.control("p/alpha/pins", {"user_id": 2, "flow_ids": [101, 104], "pinned": True})
    assert pinned["pinned"] == [101, 104]
    token = sb.token(user_id=2)
    assert sb.result("tasks.flow.Flow.pin", token, flowId=104) is False  # toggles the set state
    knobs = sb.config(portal="beta", rate=5)
    assert knobs["portal_knobs"]["beta"] == {"rate": 5.0} and knobs["effective"]["rate"] == 5.0
    assert knobs["knobs"]["rate"] == 2.0
    bad = requests.post(f"{sb.url}/_sandbox/config", json={"no_such_knob": 1}, timeout=10)
    assert bad.status_code == 400
    moved = sb.config(app_url="http://127.0.0.1:8123/")
    assert moved["app_url"] == "http://127.0.0.1:8123"
    sb.control("p/alpha/rename", {"new_name": "gamma"})
    sb.control("reset", {})
    everything = sb.control("state")
    assert set(everything["portals"]) == {"alpha", "beta"}
    alpha = everything["portals"]["alpha"]
    assert alpha["pins"]["2"] == [] and alpha["counters"]["tokens_issued"] == 0
    assert everything["knobs"]["rate"] == 2.0 and alpha["knob_overrides"] == {}
    assert sb.call("profile", token).json()["error"] == "NO_AUTH_FOUND"
    # app_url is infrastructure, not seed data: it survives a reset
    assert sb.launch()["action"] == "http://127.0.0.1:8123/b24/app/"


def test_flow_control_creates_renames_restricts_and_deletes_one_flow(sb: SandboxClient) -> None:
    token = sb.token(user_id=2)

    def listed() -> dict[int, dict[str, object]]:
        flows = sb.result("tasks.flow.Flow.list", token, select=["ID", "NAME", "ACTIVE"])
        return {int(f["id"]): f for f in flows}

    before = listed()
    created = sb.control("p/alpha/flow", {"name": "Новый <поток>"})["created"]
    assert created not in before and listed()[created]["name"] == "Новый <поток>"
    sb.control("p/alpha/flow", {"id": created, "name": "Renamed", "active": False})
    assert (listed()[created]["name"], listed()[created]["active"]) == ("Renamed", False)
    sb.control("p/alpha/pins", {"user_id": 2, "flow_ids": [created], "pinned": True})
    sb.control("p/alpha/flow", {"id": created, "access": ["U3"]})  # user 2 can no longer see it
    assert created not in listed()
    assert sb.call("tasks.flow.Flow.pin", token, flowId=created).json()["error"] == "0"
    sb.control("p/alpha/flow", {"id": created, "delete": True})
    assert created not in sb.state()["pins"]["2"]
    assert created not in {f["id"] for f in sb.state()["flows"]}
    gone = requests.post(f"{sb.url}/_sandbox/p/alpha/flow", json={"id": created}, timeout=10)
    assert gone.status_code == 404


def test_a_refused_generate_with_replace_changes_nothing(sb: SandboxClient) -> None:
    sb.control("p/alpha/pins", {"user_id": 2, "flow_ids": [101], "pinned": True})
    before = sb.state()
    for bad in ({"access": "UA"}, {"tasks_per_flow": "many"}):
        answer = requests.post(
            f"{sb.url}/_sandbox/p/alpha/flows",
            json={"count": 3, "replace": True, **bad},
            timeout=10,
        )
        assert answer.status_code == 400
    after = sb.state()
    assert (after["flows"], after["pins"]) == (before["flows"], before["pins"])


def test_seed_data_shape(sb: SandboxClient) -> None:
    alpha, beta = sb.state("alpha"), sb.state("beta")
    assert alpha["member_id"] != beta["member_id"] and len(alpha["member_id"]) == 32
    assert [u["id"] for u in alpha["users"]] == [1, 2, 3, 4, 5, 6]
    assert alpha["users"][0]["admin"] is True and alpha["users"][0]["name"] == "Анна"
    flows = {f["id"]: f for f in alpha["flows"]}
    assert len(flows) == 10 and flows[101]["visible_to"] == [1, 2, 3, 5, 6]
    assert flows[102]["visible_to"] == [1, 3, 4] and flows[106]["visible_to"] == [1, 3]
    assert any("<script>" in f["name"] for f in alpha["flows"])
    assert any(not f["active"] for f in alpha["flows"])


def test_portal_page_escapes_and_embeds_frame(sb: SandboxClient) -> None:
    page = requests.get(f"{sb.origin()}/p/alpha/?user=2&lang=ru&open=1", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.text
    assert '<iframe name="app-frame" id="app-frame"' in html
    assert 'target="app-frame"' in html and 'method="post"' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html
    assert "&lt;b&gt;Bold&lt;/b&gt; &amp; &quot;quotes&quot; &#x27;x&#x27;" in html
    assert "<b>Bold</b>" not in html
    assert 'value="2" selected' in html and 'value="ru" selected' in html
    assert '"autoOpen": true' in html
    for button in ("open-app", "install-app", "finish-install", "send-event", "event-clean"):
        assert f'id="{button}"' in html
    assert "Разработка" not in html  # flow 106 is invisible to user 2
    index = requests.get(f"{sb.url}/", timeout=10)
    assert index.status_code == 200 and f"{sb.origin('beta')}/p/beta/" in index.text


@pytest.mark.parametrize(
    ("flags", "env_flag", "shared"),
    [([], None, sys.platform != "linux"), (["--no-distinct-hosts"], None, True), ([], "0", True)],
)
def test_cli_subprocess_serves_and_exits_cleanly(
    flags: list[str], env_flag: str | None, shared: bool
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SANDBOX_DISTINCT_HOSTS", None)
    if env_flag is not None:
        env["SANDBOX_DISTINCT_HOSTS"] = env_flag
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--port", "0", "--portals", "3", "--knob", "rate=9"]
        + flags,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        base = line.split(" on ", 1)[1].split(" ", 1)[0]
        assert base.startswith("http://127.0.0.1:")
        state = requests.get(f"{base}/_sandbox/state", timeout=10).json()
        assert set(state["portals"]) == {"alpha", "beta", "p3"} and state["knobs"]["rate"] == 9.0
        assert state["distinct_hosts"] is not shared
        port = base.rsplit(":", 1)[1]
        p3 = f"{base}/p/p3/" if shared else f"http://127.0.0.4:{port}/p/p3/"
        assert state["portals"]["p3"]["page_url"] == p3 and p3 in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
