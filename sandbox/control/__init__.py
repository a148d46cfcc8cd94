"""The control API for tests and benchmarks: ``{base}/_sandbox/...`` (JSON in, JSON out).

Parameters may come as a JSON body, a form body or a query string. Routes:

=========================================  =================================================
``GET  /_sandbox/state[?portal=NAME]``      full state snapshot (one portal with ``portal``)
``GET|POST /_sandbox/config``               read / set knobs (``{"portal": NAME, ...}`` for
                                            per-portal overrides; a ``null`` value removes one;
                                            ``app_url`` changes the app's base URL)
``POST /_sandbox/reset``                    back to the seed (``{"keep_knobs": true}`` keeps
                                            knobs)
``GET|POST /_sandbox/p/NAME/launch``        mint tokens for a user and return the frame POST
                                            (``url``, ``query``, ``form``)
``GET  /_sandbox/p/NAME/open``              same, as an HTML page that auto-submits the form
                                            to the app (top-level navigation)
``POST /_sandbox/p/NAME/install_finish``    what ``BX24.installFinish()`` does
``POST /_sandbox/p/NAME/event``             send ONAPPINSTALL / ONAPPUPDATE / ONAPPUNINSTALL /
                                            ONAPPUSERREADY (``forge``: without state change)
``POST /_sandbox/p/NAME/expire``            force-expire access tokens (all or one user's)
``POST /_sandbox/p/NAME/rename``            rename the portal; with distinct hosts it moves to a
                                            new host (old host/path answer 302)
``POST /_sandbox/p/NAME/pins``              set pins as if the user clicked in Bitrix24
``POST /_sandbox/p/NAME/flows``             generate many flows (benchmarks)
``POST /_sandbox/p/NAME/flow``              create one flow (no ``id``), or change (``name``,
                                            ``active``, ``efficiency``, ``access``) or delete
                                            (``"delete": true``) the flow ``id``, as a user
                                            editing flows in Bitrix24 would
``POST /_sandbox/p/NAME/users``             add ``count`` ordinary employees (benchmarks)
``POST /_sandbox/p/NAME/tokens``            mint a token pair for a user (token-endpoint shape)
=========================================  =================================================

``NAME`` may be a portal's old name (after a rename) - the control API follows it. The control
API answers on every listener (the portal page calls it from the portal's own origin).

Routing lives here; launches in :mod:`.launch`, portal edits in :mod:`.edits`, the error type
and parameter readers in :mod:`.common`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from .. import events
from ..knobs import KnobError
from ..model import Portal
from ..params import ParamError
from ..state import SandboxState
from ..wire import Reply, Request
from .common import ControlError, bool_param, user_id_param
from .edits import edit_flow, generate_flows, generate_users, rename, set_pins
from .launch import build_launch, launch_page


def _app_url(value: Any) -> str:
    url = str(value).strip().rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ControlError(400, "app_url must be an absolute http(s) URL")
    return url


def _knobs_view(state: SandboxState, portal: Portal | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "app_url": state.app_url,
        "knobs": asdict(state.knobs),
        "portal_knobs": {
            p.name: dict(state.portal_knobs.get(p.member_id, {})) for p in state.portals.values()
        },
    }
    if portal is not None:
        view["portal"] = portal.name
        view["effective"] = asdict(state.knobs_for(portal))
    return view


PortalAction = Callable[[SandboxState, Portal, Mapping[str, Any]], dict[str, Any]]


def _install_finish(
    state: SandboxState, portal: Portal, params: Mapping[str, Any]
) -> dict[str, Any]:
    state.ensure_application_token(portal)
    portal.installed = True
    return {"installed": True, "application_token": portal.application_token}


def _expire(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    user_id = user_id_param(portal, params) if params.get("user_id") is not None else None
    return {"expired": state.expire_tokens(portal, user_id)}


def _tokens(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    pair = state.issue_tokens(portal, user_id_param(portal, params))
    return state.token_body(pair, portal)


_PORTAL_ACTIONS: dict[str, PortalAction] = {
    "install_finish": _install_finish,
    "expire": _expire,
    "rename": rename,
    "pins": set_pins,
    "flows": generate_flows,
    "flow": edit_flow,
    "users": generate_users,
    "tokens": _tokens,
    "launch": build_launch,
}


def handle_control(state: SandboxState, sub_path: str, req: Request) -> Reply:
    """Dispatch ``/_sandbox/<sub_path>``."""
    try:
        try:
            params = req.params()
        except ParamError as exc:
            raise ControlError(400, str(exc)) from exc
        return _dispatch(state, sub_path.strip("/"), req.method, params)
    except ControlError as exc:
        return Reply.json(exc.status, {"error": exc.message})
    except KnobError as exc:
        return Reply.json(400, {"error": str(exc)})


def _dispatch(state: SandboxState, path: str, http_method: str, params: dict[str, Any]) -> Reply:
    if path == "state":
        with state.lock:
            name = params.get("portal")
            if name:
                portal = state.portal_by_name_or_alias(str(name))
                if portal is None:
                    raise ControlError(404, f"no portal {name}")
                return Reply.json(200, state.snapshot(portal.name))
            return Reply.json(200, state.snapshot())
    if path == "config":
        with state.lock:
            values = {k: v for k, v in params.items() if k not in ("portal", "app_url")}
            portal = None
            if params.get("portal"):
                portal = state.portal_by_name_or_alias(str(params["portal"]))
                if portal is None:
                    raise ControlError(404, f"no portal {params['portal']}")
            if http_method == "POST":
                if params.get("app_url"):
                    if portal is not None:
                        raise ControlError(400, "app_url is global (not per portal)")
                    state.app_url = _app_url(params["app_url"])
                state.set_knobs(values, portal)
            return Reply.json(200, _knobs_view(state, portal))
    if path == "traffic":
        if http_method == "POST":
            state.traffic.reset()
        return Reply.json(200, state.traffic.snapshot())
    if path == "reset":
        _require_post(http_method)
        state.reset(keep_knobs=bool_param(params, "keep_knobs"))
        with state.lock:
            return Reply.json(200, {"reset": True, "portals": list(state.portals)})
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "p":
        return _portal_route(state, parts[1], parts[2], http_method, params)
    raise ControlError(404, f"unknown control route /_sandbox/{path}")


def _require_post(http_method: str) -> None:
    if http_method != "POST":
        raise ControlError(405, "use POST")


def _portal_route(
    state: SandboxState, name: str, action: str, http_method: str, params: dict[str, Any]
) -> Reply:
    if action == "event":
        _require_post(http_method)
        return _send_event(state, name, params)
    if action == "open":
        with state.lock:
            launch = build_launch(state, _portal(state, name), params)
        return Reply.html(200, launch_page(launch))
    handler = _PORTAL_ACTIONS.get(action)
    if handler is None:
        raise ControlError(404, f"unknown portal action {action!r}")
    if action != "launch":
        _require_post(http_method)
    with state.lock:
        return Reply.json(200, handler(state, _portal(state, name), params))


def _portal(state: SandboxState, name: str) -> Portal:
    portal = state.portal_by_name_or_alias(name)
    if portal is None:
        raise ControlError(404, f"no portal {name}")
    return portal


def _send_event(state: SandboxState, name: str, params: Mapping[str, Any]) -> Reply:
    deliver = bool_param(params, "deliver", True)
    forge = bool_param(params, "forge")
    with state.lock:
        portal = _portal(state, name)
        version = params.get("version")
        app_token = params.get("application_token")
        try:
            deliveries = events.prepare(
                state,
                portal,
                str(params.get("event") or ""),
                clean=1 if bool_param(params, "clean") else 0,
                handler=str(params.get("handler") or "") or None,
                rotate_application_token=bool_param(params, "rotate_application_token"),
                user_id=user_id_param(portal, params),
                version=int(version) if version is not None else None,
                fallback=bool_param(params, "fallback", True),
                forge=forge,
                application_token=str(app_token) if app_token is not None else None,
            )
        except (events.EventError, ValueError) as exc:
            raise ControlError(400, str(exc)) from exc
        snapshot = {"installed": portal.installed, "application_token": portal.application_token}
    results: list[dict[str, Any]] = [
        events.deliver(d)
        if deliver
        else {"handler": d.handler, "status": None, "body": "", "skipped": True}
        for d in deliveries
    ]
    for result, delivery in zip(results, deliveries, strict=True):
        result["payload"] = delivery.payload
    return Reply.json(
        200,
        {
            "deliveries": results,
            "payload": deliveries[0].payload if deliveries else None,
            "forged": forge,
            "portal": snapshot,
        },
    )
