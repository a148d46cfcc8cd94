"""The simulated OAuth server (``oauth.bitrix.info`` stand-in).

``GET|POST {base}/oauth/token/`` - parameters from the query string or the body:

* ``grant_type=refresh_token`` with ``client_id``, ``client_secret``, ``refresh_token``.
  Refresh tokens rotate and are single use: a successful refresh returns a new pair and kills
  both the used refresh token and the access token issued with it (the old access token then
  answers ``expired_token``).
* errors:

  - wrong or missing client id/secret -> HTTP 401 ``invalid_client``;
  - unknown, already used, expired or revoked refresh token -> HTTP 400 ``invalid_grant``;
  - ``grant_type=authorization_code`` -> HTTP 400 ``invalid_grant`` (no authorize endpoint
    here, so no code can be valid); any other grant type -> HTTP 400 ``invalid_request``;
  - the portal's ``payment_expired`` knob -> **HTTP 402** ``PAYMENT_REQUIRED`` (no tokens are
    issued, the refresh token stays usable for after "payment");
  - the portal's ``portal_deleted`` knob -> HTTP 404 ``PORTAL_DELETED``.

* ``refresh_drop_ratio``: the refresh is applied (rotation happens) and then the connection is
  closed without a response, which is how a chain gets lost in real life.

``GET|POST {base}/rest/app.info`` - the trusted app.info (token via ``auth``,
``access_token`` or ``Authorization: Bearer``): unknown token -> 401 ``invalid_token``,
expired -> 401 ``expired_token``.
"""

from __future__ import annotations

import hmac
from typing import Any

from .model import APP_STATUS, iso
from .params import ParamError
from .state import SandboxState
from .wire import Reply, Request


def _invalid_grant(description: str = "Invalid refresh token") -> Reply:
    return Reply.error(400, "invalid_grant", description)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def handle_token(state: SandboxState, req: Request) -> Reply:
    try:
        params = req.params()
    except ParamError as exc:
        return Reply.error(400, "invalid_request", str(exc))
    grant_type = str(params.get("grant_type") or "")
    client_id = str(params.get("client_id") or "")
    client_secret = str(params.get("client_secret") or "")
    with state.lock:
        if not (_same(client_id, state.client_id) and _same(client_secret, state.client_secret)):
            _count_failure(state, params)
            return Reply.error(401, "invalid_client", "Invalid client credentials")
        if grant_type == "authorization_code":
            return _invalid_grant("Invalid authorization code")
        if grant_type != "refresh_token":
            return Reply.error(400, "invalid_request", "Unsupported grant_type")
        token = str(params.get("refresh_token") or "")
        pair = state.refresh_tokens.get(token)
        portal = state.portal_by_member(pair.member_id) if pair is not None else None
        if pair is None or portal is None:
            state.oauth_unknown_failures += 1
            return _invalid_grant()
        counters = portal.counters
        if pair.refresh_used or state.clock() >= pair.refresh_expires_at:
            counters.refresh_failed += 1
            return _invalid_grant("The refresh token has already been used or has expired")
        if pair.client_id != client_id:
            counters.refresh_failed += 1
            return _invalid_grant("The refresh token was issued to another client")
        knobs = state.knobs_for(portal)
        if knobs.portal_deleted:
            counters.refresh_failed += 1
            return Reply.error(404, "PORTAL_DELETED", "Portal was deleted")
        if knobs.payment_expired:
            counters.refresh_failed += 1
            return Reply.error(402, "PAYMENT_REQUIRED", "Subscription has been ended")
        pair.refresh_used = True
        pair.access_killed = True
        new_pair = state.issue_tokens(portal, pair.user_id)
        counters.refresh_ok += 1
        if state.roll(knobs.refresh_drop_ratio):
            counters.refresh_dropped += 1
            return Reply.dropped()
        return Reply.json(200, state.token_body(new_pair, portal))


def _count_failure(state: SandboxState, params: dict[str, Any]) -> None:
    pair = state.refresh_tokens.get(str(params.get("refresh_token") or ""))
    portal = state.portal_by_member(pair.member_id) if pair is not None else None
    if portal is not None:
        portal.counters.refresh_failed += 1
    else:
        state.oauth_unknown_failures += 1


def handle_server_rest(state: SandboxState, method_name: str, req: Request) -> Reply:
    """``{server_endpoint}<method>``: only ``app.info`` exists on the OAuth server."""
    name = method_name[:-5] if method_name.lower().endswith(".json") else method_name
    if name.lower() != "app.info":
        return Reply.error(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
    try:
        params = req.params()
    except ParamError as exc:
        return Reply.error(400, "invalid_request", str(exc))
    token = req.auth_token(params)
    with state.lock:
        status, pair = state.check_access_token(token or "")
        portal = state.portal_by_member(pair.member_id) if pair is not None else None
        if pair is None or portal is None:
            return Reply.error(401, "invalid_token", "Unable to get application by token")
        if status == "expired":
            return Reply.error(401, "expired_token", "The access token provided has expired.")
        knobs = state.knobs_for(portal)
        result = {
            "client_id": pair.client_id,
            "scope": pair.scope,
            "expires": iso(pair.access_expires_at),
            "install": {
                "installed": portal.installed,
                "version": str(portal.app_version),
                "status": APP_STATUS,
                "scope": knobs.scope,
                "domain": state.domain(portal),
                "uri": state.portal_uri(portal),
                "client_endpoint": state.client_endpoint(portal),
                "member_id": portal.member_id,
                "member_type": "B24",
            },
            "user_id": str(pair.user_id),
        }
        return Reply.json(200, {"result": result})
