"""The OAuth server: rotation, client errors, expiry, trusted app.info, payment, lost responses."""

from __future__ import annotations

import time

import pytest
import requests

from .conftest import SandboxClient


def test_refresh_rotates_and_is_single_use(sb: SandboxClient) -> None:
    first = sb.tokens(user_id=2)
    response = sb.refresh(first["refresh_token"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert set(second) == {
        "access_token",
        "refresh_token",
        "expires",
        "expires_in",
        "member_id",
        "client_endpoint",
        "server_endpoint",
        "domain",
        "scope",
        "status",
        "user_id",
    }
    assert second["refresh_token"] != first["refresh_token"]
    assert (
        second["user_id"] == 2 and second["status"] == "F" and second["scope"] == "task,placement"
    )
    assert second["client_endpoint"] == f"{sb.origin()}/p/alpha/rest/"
    assert second["server_endpoint"] == f"{sb.url}/rest/"
    assert second["domain"] == sb.url.split("//", 1)[1]  # the OAuth server, not the portal
    assert second["expires"] - int(time.time()) in range(3590, 3602)

    reused = sb.refresh(first["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"

    old = sb.call("profile", first["access_token"])
    assert old.status_code == 401 and old.json()["error"] == "expired_token"
    assert sb.result("profile", second["access_token"])["ID"] == "2"

    counters = sb.state()["counters"]
    assert counters["refresh_ok"] == 1 and counters["refresh_failed"] == 1


def test_invalid_client_and_unknown_grant(sb: SandboxClient) -> None:
    pair = sb.tokens()
    bad_secret = sb.refresh(pair["refresh_token"], client_secret="nope")
    assert bad_secret.status_code == 401 and bad_secret.json()["error"] == "invalid_client"
    bad_id = sb.refresh(pair["refresh_token"], client_id="local.other")
    assert bad_id.status_code == 401 and bad_id.json()["error"] == "invalid_client"
    unknown = sb.refresh("not-a-token")
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_grant"
    # the failed attempts did not consume the real refresh token
    assert sb.refresh(pair["refresh_token"]).status_code == 200


def test_forced_expiry_keeps_refresh_working(sb: SandboxClient) -> None:
    user2, user3 = sb.tokens(user_id=2), sb.tokens(user_id=3)
    assert sb.control("p/alpha/expire", {"user_id": 2}) == {"expired": 1}
    expired = sb.call("profile", user2["access_token"])
    assert expired.status_code == 401
    assert expired.json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }
    assert sb.call("profile", user3["access_token"]).status_code == 200
    renewed = sb.refresh(user2["refresh_token"]).json()
    assert sb.result("profile", renewed["access_token"])["ID"] == "2"


def test_access_token_ttl(sb: SandboxClient) -> None:
    sb.config(token_ttl=0.4)
    token = sb.token()
    assert sb.call("profile", token).status_code == 200
    time.sleep(0.5)
    response = sb.call("profile", token)
    assert response.status_code == 401 and response.json()["error"] == "expired_token"


def test_server_app_info(sb: SandboxClient) -> None:
    launched = sb.launch(user_id=3)
    token = launched["form"]["AUTH_ID"]
    info = requests.get(f"{sb.url}/rest/app.info", params={"auth": token}, timeout=10)
    assert info.status_code == 200, info.text
    result = info.json()["result"]
    assert result["client_id"] == "local.sandbox0000000001"
    assert result["user_id"] == "3"
    install = result["install"]
    state = sb.state()
    assert install["member_id"] == state["member_id"] == launched["form"]["member_id"]
    assert install["domain"] == state["domain"]
    assert install["client_endpoint"] == f"{sb.origin()}/p/alpha/rest/"
    expected_uri = sb.origin() if sb.server.distinct_hosts else f"http://{state['domain']}"
    assert install["uri"] == expected_uri
    assert install["installed"] is False

    bearer = requests.post(
        f"{sb.url}/rest/app.info", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert bearer.status_code == 200

    unknown = requests.get(f"{sb.url}/rest/app.info", params={"auth": "x" * 64}, timeout=10)
    assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_token"
    sb.control("p/alpha/expire", {})
    expired = requests.get(f"{sb.url}/rest/app.info", params={"auth": token}, timeout=10)
    assert expired.status_code == 401 and expired.json()["error"] == "expired_token"


def test_payment_expired_blocks_refresh_without_consuming_it(sb: SandboxClient) -> None:
    pair = sb.tokens()
    sb.config(portal="alpha", payment_expired=True)
    blocked = sb.refresh(pair["refresh_token"])
    assert blocked.status_code == 402 and blocked.json()["error"] == "PAYMENT_REQUIRED"
    assert sb.result("app.info", pair["access_token"])["PAYMENT_EXPIRED"] == "Y"
    sb.config(portal="alpha", payment_expired=None)
    assert sb.refresh(pair["refresh_token"]).status_code == 200


def test_lost_refresh_response_breaks_the_chain(sb: SandboxClient) -> None:
    pair = sb.tokens()
    sb.config(refresh_drop_ratio=1.0)
    with pytest.raises(requests.ConnectionError):
        sb.refresh(pair["refresh_token"])
    sb.config(refresh_drop_ratio=0.0)
    # the rotation happened server-side, so the client's only refresh token is now dead
    retry = sb.refresh(pair["refresh_token"])
    assert retry.status_code == 400 and retry.json()["error"] == "invalid_grant"
    counters = sb.state()["counters"]
    assert counters["refresh_ok"] == 1 and counters["refresh_dropped"] == 1


def test_token_auth_variants_and_cross_portal(sb: SandboxClient) -> None:
    alpha = sb.token("alpha", 2)
    missing = sb.call("profile", None)
    assert missing.status_code == 401
    assert missing.json() == {
        "error": "NO_AUTH_FOUND",
        "error_description": "Wrong authorization data",
    }
    wrong_portal = sb.call("profile", alpha, portal="beta")
    assert wrong_portal.status_code == 401 and wrong_portal.json()["error"] == "NO_AUTH_FOUND"
    bearer = requests.get(
        f"{sb.endpoint()}profile", headers={"Authorization": f"Bearer {alpha}"}, timeout=10
    )
    assert bearer.json()["result"]["ID"] == "2"
    by_param = requests.get(
        f"{sb.endpoint()}profile.json", params={"access_token": alpha}, timeout=10
    )
    assert by_param.json()["result"]["ID"] == "2"
    code = requests.get(
        f"{sb.url}/oauth/token/",
        params={
            "grant_type": "authorization_code",
            "client_id": "local.sandbox0000000001",
            "client_secret": "sandbox-client-secret",
            "code": "abc",
        },
        timeout=10,
    )
    assert code.status_code == 400 and code.json()["error"] == "invalid_grant"
