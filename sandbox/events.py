"""Application lifecycle events (ONAPPINSTALL / ONAPPUPDATE / ONAPPUNINSTALL).

Payloads are built exactly the way Bitrix24's queue servers send them: an
``application/x-www-form-urlencoded`` POST with bracket keys (``data[VERSION]``,
``auth[access_token]``, ...). ``ONAPPINSTALL`` and ``ONAPPUPDATE`` carry a freshly minted
token pair (with ``refresh_token``) for the target user; ``ONAPPUNINSTALL`` carries no tokens
at all (``sendAuth=false`` in the core) - only ``application_token`` authenticates it.

:func:`prepare` applies the side effects and returns the deliveries (call it with the state
lock held); :func:`deliver` does the network part (call it without the lock - the app may
call back into the sandbox while handling the event).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from .params import flatten
from .state import APP_STATUS, Portal, SandboxState

LIFECYCLE_EVENTS = ("ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL")
DELIVERY_TIMEOUT = 10.0
USER_AGENT = "Bitrix24 Webhook Engine"


@dataclass
class Delivery:
    handler: str
    payload: dict[str, str]  # flat, bracket keys, in sending order


class EventError(ValueError):
    """Bad control request for an event."""


def events_url(state: SandboxState) -> str:
    return f"{state.app_url}/b24/events/"


def _implicit_handler_id(portal: Portal, event: str, handler: str) -> int:
    key = f"{event} {handler}"
    if key not in portal.implicit_handler_ids:
        portal.implicit_handler_ids[key] = portal.new_binding_id()
    return portal.implicit_handler_ids[key]


def prepare(
    state: SandboxState,
    portal: Portal,
    event: str,
    *,
    clean: int = 0,
    handler: str | None = None,
    rotate_application_token: bool = False,
    user_id: int = 1,
    version: int | None = None,
    fallback: bool = True,
) -> list[Delivery]:
    """Apply the event's side effects to ``portal`` and build the payload per target."""
    event = event.upper()
    if event not in LIFECYCLE_EVENTS:
        raise EventError(f"event must be one of {', '.join(LIFECYCLE_EVENTS)}")
    if user_id not in portal.users:
        raise EventError(f"no user {user_id} on portal {portal.name}")
    data: dict[str, Any]
    if event == "ONAPPINSTALL":
        if portal.installed or rotate_application_token:
            portal.application_token = state.new_application_token()  # reinstall: new token
        else:
            state.ensure_application_token(portal)
        portal.installed = True
        data = {
            "VERSION": str(portal.app_version),
            "ACTIVE": "Y",
            "INSTALLED": "Y",
            "LANGUAGE_ID": portal.language,
        }
        bound = _bound(portal, event)
    elif event == "ONAPPUPDATE":
        previous = portal.app_version
        portal.app_version = version if version is not None else previous + 1
        portal.events = []  # an update drops every event binding
        if rotate_application_token:
            portal.application_token = state.new_application_token()
        data = {
            "VERSION": str(portal.app_version),
            "PREVIOUS_VERSION": str(previous),
            "LANGUAGE_ID": portal.language,
        }
        bound = []
    else:
        bound = _bound(portal, event)
        data = {"LANGUAGE_ID": portal.language, "CLEAN": str(int(bool(clean)))}
    application_token = portal.application_token
    if event == "ONAPPUNINSTALL":
        portal.installed = False
        portal.application_token = ""
        portal.placements = []
        portal.events = []
        state.revoke_portal_tokens(portal)

    targets: list[tuple[str, int, int]] = []  # (url, handler id, token user)
    if handler:
        targets.append((handler, _implicit_handler_id(portal, event, handler), user_id))
    else:
        targets.extend((b.handler, b.id, b.user_id or user_id) for b in bound)
        if not targets and fallback:
            url = events_url(state)
            targets.append((url, _implicit_handler_id(portal, event, url), user_id))

    deliveries = []
    for url, handler_id, target_user in targets:
        auth: dict[str, Any]
        if event == "ONAPPUNINSTALL":
            auth = {
                "domain": portal.domain,
                "server_endpoint": state.server_endpoint,
                "client_endpoint": state.client_endpoint(portal),
                "member_id": portal.member_id,
                "application_token": application_token,
            }
        else:
            pair = state.issue_tokens(
                portal, target_user if target_user in portal.users else user_id
            )
            body = state.token_body(pair, portal)
            auth = {
                "access_token": pair.access_token,
                "expires": body["expires"],
                "expires_in": body["expires_in"],
                "scope": pair.scope,
                "domain": portal.domain,
                "server_endpoint": state.server_endpoint,
                "status": APP_STATUS,
                "client_endpoint": state.client_endpoint(portal),
                "member_id": portal.member_id,
                "user_id": pair.user_id,
                "refresh_token": pair.refresh_token,
                "application_token": application_token,
            }
        message = {
            "event": event,
            "event_handler_id": str(handler_id),
            "data": data,
            "ts": str(int(state.clock())),
            "auth": auth,
        }
        deliveries.append(Delivery(url, dict(flatten(message))))
    portal.counters.events_sent += len(deliveries)
    return deliveries


def _bound(portal: Portal, event: str) -> list[Any]:
    return [b for b in portal.events if b.event == event and not b.offline and b.handler]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Report a redirect as the handler's answer instead of following it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def deliver(delivery: Delivery, timeout: float = DELIVERY_TIMEOUT) -> dict[str, Any]:
    """POST one event; never raises. Returns ``{handler, status, body}`` (status None: failed)."""
    data = urlencode(list(delivery.payload.items())).encode("utf-8")
    request = urllib.request.Request(  # noqa: S310 - the handler URL is test-controlled
        delivery.handler,
        data=data,
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": USER_AGENT},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status = response.status
            body = response.read(2000)
    except urllib.error.HTTPError as exc:
        status = exc.code
        body = exc.read(2000) if exc.fp is not None else b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"handler": delivery.handler, "status": None, "body": "", "error": str(exc)}
    return {
        "handler": delivery.handler,
        "status": status,
        "body": body.decode("utf-8", errors="replace")[:500],
    }
