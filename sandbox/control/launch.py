"""Launches: what Bitrix24 POSTs into the app frame (``/_sandbox/p/NAME/launch`` and ``open``)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from html import escape
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..model import APP_STATUS, Portal, TokenPair
from ..state import SandboxState
from .common import ControlError, bool_param, user_id_param


def build_launch(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    """Mint tokens for a user and return the frame POST (``url``, ``query``, ``form``)."""
    user_id = user_id_param(portal, params)
    placement = str(params.get("placement") or "DEFAULT").upper()
    lang = str(params.get("lang") or portal.language)
    installer = bool_param(params, "installer")
    options = _placement_options(params)
    explicit = str(params.get("handler") or "")
    url = _handler_url(state, portal, placement, installer, explicit)
    if placement != "DEFAULT":
        options.setdefault("URI", state.page_url(portal))
    pair = state.issue_tokens(portal, user_id)
    query = {
        "DOMAIN": state.domain(portal),
        "PROTOCOL": state.protocol(portal),
        "LANG": lang,
        "APP_SID": secrets.token_hex(16),
    }
    separator = "&" if urlsplit(url).query else "?"
    return {
        "url": f"{url}{separator}{urlencode(query)}",
        "action": url,
        "query": query,
        "form": _launch_form(state, portal, pair, placement, options),
        "portal": portal.name,
        "user_id": user_id,
        "installed": portal.installed,
        "installer": installer,
    }


def _placement_options(params: Mapping[str, Any]) -> dict[str, Any]:
    raw_options = params.get("placement_options") or {}
    if isinstance(raw_options, str):
        try:
            raw_options = json.loads(raw_options)
        except ValueError as exc:
            raise ControlError(400, "placement_options must be an object or a JSON string") from exc
    if not isinstance(raw_options, Mapping):
        raise ControlError(400, "placement_options must be an object")
    return dict(raw_options)


def _handler_url(
    state: SandboxState, portal: Portal, placement: str, installer: bool, explicit: str
) -> str:
    """Where the frame goes: the installer, an explicit handler, the app or a bound widget."""
    if installer:
        if not portal.installed:
            state.ensure_application_token(portal)  # the app record exists from now on
        return f"{state.app_url}/b24/install/"
    if explicit:
        return explicit
    if placement == "DEFAULT":
        return f"{state.app_url}/b24/app/"
    bound = [b for b in portal.placements if b.placement == placement]
    if not bound:
        raise ControlError(409, f"no handler is bound for placement {placement}")
    if not portal.installed:
        raise ControlError(409, "widgets are not shown until the installation is finished")
    return bound[0].handler


def _launch_form(
    state: SandboxState, portal: Portal, pair: TokenPair, placement: str, options: dict[str, Any]
) -> dict[str, str]:
    return {
        "AUTH_ID": pair.access_token,
        "AUTH_EXPIRES": str(max(int(round(pair.access_expires_at - pair.issued_at)), 0)),
        "REFRESH_ID": pair.refresh_token,
        "SERVER_ENDPOINT": state.server_endpoint,
        "member_id": portal.member_id,
        "status": APP_STATUS,
        "PLACEMENT": placement,
        "PLACEMENT_OPTIONS": php_json(options),
        "APPLICATION_TOKEN": portal.application_token,
        "APPLICATION_SCOPE": pair.scope,
    }


def php_json(value: Any) -> str:
    """``json_encode`` look-alike: ASCII-escaped unicode and escaped slashes."""
    return json.dumps(value).replace("/", "\\/")


def launch_page(launch: Mapping[str, Any]) -> str:
    """A page that POSTs the launch form to the app at top level (no iframe)."""
    inputs = "\n".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(str(v))}">'
        for k, v in launch["form"].items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Opening app…</title></head>"
        f'<body><form id="launch" method="post" action="{escape(launch["url"])}">{inputs}'
        "<noscript><button>Open</button></noscript></form>"
        "<script>document.getElementById('launch').submit();</script></body></html>"
    )
