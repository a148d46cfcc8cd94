"""Every portal on its own loopback host: routing, strictness, renames, reset, payload addresses."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from sandbox.server import SandboxServer
from sandbox.state import loopback_host, seed_hosts

from .conftest import Receiver, SandboxClient

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="only Linux routes all of 127.0.0.0/8 to loopback"
)
TIMEOUT = 10


def at(host: str, sb: SandboxClient, path: str) -> str:
    return f"http://{host}:{sb.server.port}{path}"


def get(url: str, **kwargs: Any) -> requests.Response:
    return requests.get(url, timeout=TIMEOUT, allow_redirects=False, **kwargs)


def test_address_blocks() -> None:
    assert seed_hosts(3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert loopback_host(0, 252) == "127.0.0.254" and loopback_host(0, 253) == "127.0.1.2"
    assert loopback_host(1, 0) == "127.1.0.2" and loopback_host(1, 1) == "127.1.0.3"
    with pytest.raises(ValueError):
        loopback_host(0, 253 * 256)


def test_each_portal_rest_on_its_own_host(sb: SandboxClient) -> None:
    port = sb.server.port
    state = sb.control("state")
    assert state["distinct_hosts"] is True and state["base_url"] == f"http://127.0.0.1:{port}"
    alpha, beta = state["portals"]["alpha"], state["portals"]["beta"]
    assert alpha["origin"] == f"http://127.0.0.2:{port}" == sb.origin("alpha")
    assert beta["origin"] == f"http://127.0.0.3:{port}" == sb.origin("beta")
    assert alpha["client_endpoint"] == f"http://127.0.0.2:{port}/p/alpha/rest/"
    assert sb.server.portal_url("beta") == f"http://127.0.0.3:{port}/p/beta/"
    assert sb.server.hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    for name in ("alpha", "beta"):
        token = sb.token(name, 2)
        answer = get(f"{sb.endpoint(name)}profile", params={"auth": token})
        assert answer.status_code == 200 and answer.json()["result"]["ID"] == "2"
    # the OAuth server and the control API stay on the base URL
    assert sb.refresh(sb.tokens("beta")["refresh_token"]).status_code == 200


def test_wrong_host_is_404(sb: SandboxClient) -> None:
    token = sb.token("alpha", 2)
    port = sb.server.port
    for host in ("127.0.0.1", "127.0.0.3"):
        rest = get(at(host, sb, "/p/alpha/rest/profile"), params={"auth": token})
        assert rest.status_code == 404, host
        assert (
            rest.json()["error"] == "NOT_FOUND" and "wrong host" in rest.json()["error_description"]
        )
    # another portal's host has no page for alpha; the base host sends a person to alpha's own
    page = get(at("127.0.0.3", sb, "/p/alpha/?user=2"))
    assert page.status_code == 404 and page.json()["error"] == "NOT_FOUND"
    typed = get(at("127.0.0.1", sb, "/p/alpha/?user=2"))
    assert typed.status_code == 302
    assert typed.headers["Location"] == f"http://127.0.0.2:{port}/p/alpha/?user=2"
    # the Host header cannot move a request: the socket's local address decides
    faked = get(
        at("127.0.0.3", sb, "/p/alpha/rest/profile"),
        params={"auth": token},
        headers={"Host": f"127.0.0.2:{port}"},
    )
    assert faked.status_code == 404
    assert get(at("127.0.0.2", sb, "/p/nope/rest/profile")).json()["error"] == "PORTAL_NOT_FOUND"
    # a portal host serves its portal only: no OAuth server, no index there
    assert get(at("127.0.0.2", sb, "/oauth/token/")).status_code == 404
    assert get(at("127.0.0.2", sb, "/rest/app.info"), params={"auth": token}).status_code == 404
    root = get(at("127.0.0.3", sb, "/"))
    assert root.status_code == 302 and root.headers["Location"] == sb.server.portal_url("beta")
    # ... but the control API answers everywhere (the portal page calls it same-origin)
    same_origin = get(at("127.0.0.2", sb, "/_sandbox/state?portal=alpha"))
    assert same_origin.status_code == 200


def test_rename_moves_to_a_new_host(sb: SandboxClient) -> None:
    pair = sb.tokens("alpha", 2)
    auth = pair["access_token"]
    renamed = sb.control("p/alpha/rename", {"new_name": "alpha2"})["portal"]
    port = sb.server.port
    new_origin = f"http://127.1.0.2:{port}"
    assert renamed["origin"] == new_origin and renamed["old_origins"] == [
        f"http://127.0.0.2:{port}"
    ]
    assert "127.1.0.2" in sb.server.hosts
    # old host + old name, old host + new name, new host + old name: 302 to the new address
    for host, name in (("127.0.0.2", "alpha"), ("127.0.0.2", "alpha2"), ("127.1.0.2", "alpha")):
        moved = get(at(host, sb, f"/p/{name}/rest/profile?auth={auth}&x=1"))
        assert moved.status_code == 302, (host, name)
        assert moved.headers["Location"] == f"{new_origin}/p/alpha2/rest/profile?auth={auth}&x=1"
        page = get(at(host, sb, f"/p/{name}/?user=2"))
        assert page.headers["Location"] == f"{new_origin}/p/alpha2/?user=2"
    followed = requests.get(at("127.0.0.2", sb, f"/p/alpha/rest/profile?auth={auth}"), timeout=10)
    assert followed.status_code == 200 and followed.json()["result"]["ID"] == "2"
    # elsewhere the new name is just on the wrong host
    for host in ("127.0.0.1", "127.0.0.3"):
        assert get(at(host, sb, "/p/alpha2/rest/profile")).status_code == 404
    assert sb.refresh(pair["refresh_token"]).json()["client_endpoint"] == (
        f"{new_origin}/p/alpha2/rest/"
    )
    # a second rename takes the next host; the first addresses lead straight to the newest
    again = sb.control("p/alpha2/rename", {"new_name": "alpha3"})["portal"]
    assert again["origin"] == f"http://127.1.0.3:{port}"
    first = get(at("127.0.0.2", sb, "/p/alpha/"))
    assert first.headers["Location"] == f"http://127.1.0.3:{port}/p/alpha3/"


def test_reset_restores_seed_hosts(sb: SandboxClient) -> None:
    sb.control("p/alpha/rename", {"new_name": "alpha2"})
    sb.control("p/beta/rename", {"new_name": "alpha"})  # takes the old name, on a new host
    port = sb.server.port
    assert sb.origin("alpha") == f"http://127.1.0.3:{port}"
    assert get(at("127.0.0.2", sb, "/p/alpha/")).headers["Location"] == (
        f"http://127.1.0.2:{port}/p/alpha2/"  # the old address still belongs to the old alpha
    )
    sb.control("reset", {})
    state = sb.control("state")["portals"]
    assert state["alpha"]["origin"] == f"http://127.0.0.2:{port}"
    assert state["beta"]["origin"] == f"http://127.0.0.3:{port}"
    token = sb.token("alpha", 1)
    assert get(at("127.0.0.2", sb, "/p/alpha/rest/profile"), params={"auth": token}).ok
    gone = get(at("127.1.0.2", sb, "/p/alpha2/rest/profile"), params={"auth": token})
    assert gone.status_code == 404 and gone.json()["error"] == "PORTAL_NOT_FOUND"
    assert get(at("127.1.0.3", sb, "/p/alpha/")).status_code == 404
    # the rename hosts start over; their listeners are reused
    hosts_before = sb.server.hosts
    renamed = sb.control("p/alpha/rename", {"new_name": "gamma"})["portal"]
    assert renamed["origin"] == f"http://127.1.0.2:{port}" and sb.server.hosts == hosts_before


def test_payloads_carry_the_portals_own_host(sb: SandboxClient, receiver: Receiver) -> None:
    origin = sb.origin("beta")
    endpoint = f"{origin}/p/beta/rest/"
    domain = urlsplit(origin).netloc
    assert sb.state("beta")["domain"] == domain == f"127.0.0.3:{sb.server.port}"
    assert sb.state("beta")["display_domain"] == "beta.sandbox.localhost"
    launched = sb.launch("beta", user_id=2)
    query = {k: v[0] for k, v in parse_qs(urlsplit(launched["url"]).query).items()}
    scheme = "https" if query["PROTOCOL"] == "1" else "http"
    assert query["DOMAIN"] == domain and f"{scheme}://{query['DOMAIN']}" == origin
    pair = sb.tokens("beta", 2)
    assert pair["client_endpoint"] == endpoint
    assert pair["domain"] == urlsplit(sb.url).netloc  # the OAuth server's, as on Bitrix24
    info = get(f"{sb.url}/rest/app.info", params={"auth": pair["access_token"]}).json()["result"]
    install = info["install"]
    assert (install["client_endpoint"], install["uri"], install["domain"]) == (
        endpoint,
        origin,
        domain,
    )
    refreshed = sb.refresh(pair["refresh_token"]).json()
    assert refreshed["client_endpoint"] == endpoint
    sent = sb.control("p/beta/event", {"event": "ONAPPINSTALL", "handler": f"{receiver.url}/h/"})
    form = receiver.requests[0].form
    assert form["auth[client_endpoint]"] == endpoint and form["auth[domain]"] == domain
    assert sent["payload"] == form
    admin = sb.token("beta")
    sb.result(
        "placement.bind", admin, "beta", PLACEMENT="TASK_VIEW_TAB", HANDLER=f"{receiver.url}/"
    )
    placed = sb.launch("beta", user_id=2, placement="TASK_VIEW_TAB")
    assert json.loads(placed["form"]["PLACEMENT_OPTIONS"])["URI"] == f"{origin}/p/beta/"


def test_portal_page_is_served_from_the_portal_origin(sb: SandboxClient) -> None:
    page = get(f"{sb.origin()}/p/alpha/?user=2&open=1")
    assert page.status_code == 200 and '<iframe name="app-frame"' in page.text
    assert sb.state()["domain"] in page.text and sb.origin() in page.text
    assert '"control": "/_sandbox/p/alpha/"' in page.text  # same-origin control calls
    typed = get(f"{sb.url}/p/alpha/")  # the OAuth server's origin sends a person there
    assert typed.status_code == 302 and typed.headers["Location"] == f"{sb.origin()}/p/alpha/"
    index = get(f"{sb.url}/")
    assert f'href="{sb.origin("alpha")}/p/alpha/"' in index.text


def test_many_portals_one_accept_thread() -> None:
    before = set(threading.enumerate())  # thread objects: idents are reused
    with SandboxServer(port=0, portals=200) as srv:
        assert len(srv.hosts) == 201 and srv.hosts[-1] == "127.0.0.201"
        threads = [t for t in threading.enumerate() if t not in before]
        assert [t.name for t in threads if t.name.startswith("sandbox-")] == [f"sandbox-{srv.port}"]
        assert len(threads) < 20  # not a thread per listener (other tests' threads may come and go)
        last = srv.client_endpoint("p200")
        assert last == f"http://127.0.0.201:{srv.port}/p/p200/rest/"
        token = requests.post(
            f"{srv.url}/_sandbox/p/p200/tokens", json={"user_id": 1}, timeout=TIMEOUT
        ).json()["access_token"]
        assert get(f"{last}user.admin", params={"auth": token}).json()["result"] is True
        wrong = get(f"http://127.0.0.200:{srv.port}/p/p200/rest/user.admin")
        assert wrong.status_code == 404
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{last}user.admin", timeout=2)  # stop() closed every listener


def test_shared_host_mode_is_the_old_layout() -> None:
    with SandboxServer(port=0, distinct_hosts=False) as srv:
        sb = SandboxClient(srv)
        assert srv.hosts == ["127.0.0.1"] and sb.origin("alpha") == srv.url
        assert srv.client_endpoint("alpha") == f"{srv.url}/p/alpha/rest/"
        assert sb.state()["domain"] == "alpha.sandbox.localhost"
        assert sb.launch()["query"]["DOMAIN"] == "alpha.sandbox.localhost"
        token = sb.token("alpha", 2)
        assert sb.result("profile", token)["ID"] == "2"
        sb.control("p/alpha/rename", {"new_name": "alpha2"})
        moved = get(f"{srv.url}/p/alpha/rest/profile?auth={token}")
        assert moved.headers["Location"] == f"{srv.url}/p/alpha2/rest/profile?auth={token}"
    with pytest.raises(ValueError):
        SandboxServer(host="0.0.0.0", port=0, distinct_hosts=True)  # noqa: S104
