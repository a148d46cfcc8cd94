"""Application events: ONAPPINSTALL / ONAPPUPDATE / ONAPPUNINSTALL / ONAPPUSERREADY.

Payloads are built exactly the way Bitrix24's queue servers send them: an
``application/x-www-form-urlencoded`` POST with bracket keys (``data[VERSION]``,
``auth[access_token]``, ...). ``ONAPPINSTALL`` and ``ONAPPUPDATE`` carry a freshly minted
token pair (with ``refresh_token``) for the target user; ``ONAPPUNINSTALL`` carries no tokens
at all (``sendAuth=false`` in the core) - only ``application_token`` authenticates it.

``ONAPPUSERREADY`` is the handler the core registers for every app at its installer URL
(``{app_url}/b24/install/``): ``data[LANGUAGE_ID]`` and an ``auth`` with a fresh access token
of the user but no ``refresh_token``. It changes nothing in the portal's install state.

A *forged* event (``forge=True``) is what a hostile portal user can build and POST to the app
themselves: ONAPPINSTALL/ONAPPUPDATE with a token pair that user can get from their own frame,
ONAPPUNINSTALL with whatever ``application_token`` they know. It is delivered, but the
sandbox's state is untouched (no install, rotation, version bump, unbinding or revocation)
and it is counted in ``events_forged`` instead of ``events_sent``.

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

from .model import APP_STATUS, EventBinding, Portal
from .params import flatten
from .state import SandboxState

LIFECYCLE_EVENTS = ("ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL")
USER_READY = "ONAPPUSERREADY"
CONTROL_EVENTS = (*LIFECYCLE_EVENTS, USER_READY)
DELIVERY_TIMEOUT = 10.0
USER_AGENT = "Bitrix24 Webhook Engine"


@dataclass
class Delivery:
    handler: str
    payload: dict[str, str]  # flat, bracket keys, in sending order


class EventError(ValueError):
    """Bad control request for an event."""


@dataclass
class EventSpec:
    """What the control call asked for."""

    event: str
    user_id: int = 1
    clean: int = 0
    handler: str | None = None
    rotate_application_token: bool = False
    version: int | None = None
    fallback: bool = True
    forge: bool = False
    application_token: str | None = None


@dataclass
class _Built:
    """An event's content before it is addressed: ``tokens`` is "pair", "access" or "none"."""

    data: dict[str, Any]
    bound: list[EventBinding]
    application_token: str
    tokens: str
    default_url: str


def events_url(state: SandboxState) -> str:
    return f"{state.app_url}/b24/events/"


def installer_url(state: SandboxState) -> str:
    return f"{state.app_url}/b24/install/"


def _handler_id(portal: Portal, event: str, handler: str, remember: bool) -> int:
    key = f"{event} {handler}"
    if key not in portal.implicit_handler_ids:
        if not remember:  # a forger guesses; the portal registers nothing
            return portal.next_binding_id
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
    forge: bool = False,
    application_token: str | None = None,
) -> list[Delivery]:
    """Apply the event's side effects to ``portal`` (none if forged); build each payload."""
    spec = EventSpec(
        event.upper(),
        user_id,
        clean,
        handler,
        rotate_application_token,
        version,
        fallback,
        forge,
        application_token,
    )
    if spec.event not in CONTROL_EVENTS:
        raise EventError(f"event must be one of {', '.join(CONTROL_EVENTS)}")
    if user_id not in portal.users:
        raise EventError(f"no user {user_id} on portal {portal.name}")
    if application_token is not None and not forge:
        raise EventError("application_token can only be chosen for a forged event")
    if spec.event == USER_READY:
        built = _user_ready(state, portal, spec)
    elif forge:
        built = _forged(state, portal, spec)
    else:
        built = _apply(state, portal, spec)
    deliveries = [
        Delivery(url, dict(flatten(_message(state, portal, spec, built, handler_id, target))))
        for url, handler_id, target in _targets(portal, spec, built)
    ]
    if forge:
        portal.counters.events_forged += len(deliveries)
    else:
        portal.counters.events_sent += len(deliveries)
    return deliveries


def _install_data(portal: Portal) -> dict[str, Any]:
    return {
        "VERSION": str(portal.app_version),
        "ACTIVE": "Y",
        "INSTALLED": "Y",
        "LANGUAGE_ID": portal.language,
    }


def _update_data(portal: Portal, version: int, previous: int) -> dict[str, Any]:
    return {
        "VERSION": str(version),
        "PREVIOUS_VERSION": str(previous),
        "LANGUAGE_ID": portal.language,
    }


def _uninstall_data(portal: Portal, clean: int) -> dict[str, Any]:
    return {"LANGUAGE_ID": portal.language, "CLEAN": str(int(bool(clean)))}


def _apply(state: SandboxState, portal: Portal, spec: EventSpec) -> _Built:
    """A genuine lifecycle event: change the portal's install state, then describe it."""
    fallback = events_url(state)
    if spec.event == "ONAPPINSTALL":
        if portal.installed or spec.rotate_application_token:
            portal.application_token = state.new_application_token()  # reinstall: new token
        else:
            state.ensure_application_token(portal)
        portal.installed = True
        bound = _bound(portal, spec.event)
        return _Built(_install_data(portal), bound, portal.application_token, "pair", fallback)
    if spec.event == "ONAPPUPDATE":
        previous = portal.app_version
        portal.app_version = spec.version if spec.version is not None else previous + 1
        portal.events = []  # an update drops every event binding
        if spec.rotate_application_token:
            portal.application_token = state.new_application_token()
        data = _update_data(portal, portal.app_version, previous)
        return _Built(data, [], portal.application_token, "pair", fallback)
    bound = _bound(portal, spec.event)
    application_token = portal.application_token
    portal.installed = False
    portal.application_token = ""
    portal.placements = []
    portal.events = []
    state.revoke_portal_tokens(portal)
    data = _uninstall_data(portal, spec.clean)
    return _Built(data, bound, application_token, "none", fallback)


def _forged(state: SandboxState, portal: Portal, spec: EventSpec) -> _Built:
    """The same event as a hostile user would build it; the portal's state stays as it is."""
    token = (
        spec.application_token if spec.application_token is not None else portal.application_token
    )
    fallback = events_url(state)
    if spec.event == "ONAPPINSTALL":
        bound = _bound(portal, spec.event)
        return _Built(_install_data(portal), bound, token, "pair", fallback)
    if spec.event == "ONAPPUPDATE":
        version = spec.version if spec.version is not None else portal.app_version + 1
        data = _update_data(portal, version, portal.app_version)
        return _Built(data, [], token, "pair", fallback)
    data = _uninstall_data(portal, spec.clean)
    return _Built(data, _bound(portal, spec.event), token, "none", fallback)


def _user_ready(state: SandboxState, portal: Portal, spec: EventSpec) -> _Built:
    token = (
        spec.application_token if spec.application_token is not None else portal.application_token
    )
    data = {"LANGUAGE_ID": portal.language}
    return _Built(data, [], token, "access", installer_url(state))


def _targets(portal: Portal, spec: EventSpec, built: _Built) -> list[tuple[str, int, int]]:
    """(url, handler id, token user) per delivery."""
    remember = not spec.forge
    if spec.handler:
        return [
            (spec.handler, _handler_id(portal, spec.event, spec.handler, remember), spec.user_id)
        ]
    targets = [(b.handler, b.id, b.user_id or spec.user_id) for b in built.bound]
    if not targets and (spec.fallback or spec.event == USER_READY):
        url = built.default_url
        targets.append((url, _handler_id(portal, spec.event, url, remember), spec.user_id))
    return targets


def _message(
    state: SandboxState,
    portal: Portal,
    spec: EventSpec,
    built: _Built,
    handler_id: int,
    target_user: int,
) -> dict[str, Any]:
    return {
        "event": spec.event,
        "event_handler_id": str(handler_id),
        "data": built.data,
        "ts": str(int(state.clock())),
        "auth": _auth(
            state, portal, built, target_user if target_user in portal.users else spec.user_id
        ),
    }


def _auth(state: SandboxState, portal: Portal, built: _Built, user_id: int) -> dict[str, Any]:
    where = {
        "domain": state.domain(portal),
        "server_endpoint": state.server_endpoint,
        "client_endpoint": state.client_endpoint(portal),
        "member_id": portal.member_id,
    }
    if built.tokens == "none":
        return {**where, "application_token": built.application_token}
    pair = state.issue_tokens(portal, user_id)
    expires_in = state.token_body(pair, portal)["expires_in"]
    if built.tokens == "access":
        return {
            "access_token": pair.access_token,
            "expires_in": expires_in,
            "scope": pair.scope,
            **where,
            "user_id": pair.user_id,
            "application_token": built.application_token,
        }
    return {
        "access_token": pair.access_token,
        "expires": int(pair.access_expires_at),
        "expires_in": expires_in,
        "scope": pair.scope,
        "domain": where["domain"],
        "server_endpoint": state.server_endpoint,
        "status": APP_STATUS,
        "client_endpoint": where["client_endpoint"],
        "member_id": portal.member_id,
        "user_id": pair.user_id,
        "refresh_token": pair.refresh_token,
        "application_token": built.application_token,
    }


def _bound(portal: Portal, event: str) -> list[EventBinding]:
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
