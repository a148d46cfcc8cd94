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
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict
from html import escape
from typing import Any
from urllib.parse import urlencode, urlsplit

from . import events
from .knobs import KnobError
from .model import APP_STATUS, Flow, Portal, Task, User, iso
from .params import ParamError
from .state import SandboxState
from .wire import Reply, Request

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# parameter helpers


def _int_param(params: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if value is None or isinstance(value, bool):
        raise ControlError(400, f"{key!r} is required (integer)")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ControlError(400, f"{key!r} must be an integer") from exc


def _bool_param(params: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(value)


def _user_id(portal: Portal, params: Mapping[str, Any], default: int | None = 1) -> int:
    user_id = _int_param(params, "user_id", default)
    if user_id not in portal.users:
        raise ControlError(400, f"portal {portal.name} has no user {user_id}")
    return user_id


def php_json(value: Any) -> str:
    """``json_encode`` look-alike: ASCII-escaped unicode and escaped slashes."""
    return json.dumps(value).replace("/", "\\/")


# --------------------------------------------------------------------------------------------
# launch (what Bitrix24 POSTs into the app frame)


def build_launch(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    user_id = _user_id(portal, params)
    placement = str(params.get("placement") or "DEFAULT").upper()
    lang = str(params.get("lang") or portal.language)
    installer = _bool_param(params, "installer")
    raw_options = params.get("placement_options") or {}
    if isinstance(raw_options, str):
        try:
            raw_options = json.loads(raw_options)
        except ValueError as exc:
            raise ControlError(400, "placement_options must be an object or a JSON string") from exc
    if not isinstance(raw_options, Mapping):
        raise ControlError(400, "placement_options must be an object")
    options = dict(raw_options)
    explicit = str(params.get("handler") or "")
    if installer:
        url = f"{state.app_url}/b24/install/"
        if not portal.installed:
            state.ensure_application_token(portal)  # the app record exists from now on
    elif explicit:
        url = explicit
    elif placement == "DEFAULT":
        url = f"{state.app_url}/b24/app/"
    else:
        bound = [b for b in portal.placements if b.placement == placement]
        if not bound:
            raise ControlError(409, f"no handler is bound for placement {placement}")
        if not portal.installed:
            raise ControlError(409, "widgets are not shown until the installation is finished")
        url = bound[0].handler
    if placement != "DEFAULT":
        options.setdefault("URI", state.page_url(portal))
    pair = state.issue_tokens(portal, user_id)
    query = {
        "DOMAIN": state.domain(portal),
        "PROTOCOL": state.protocol(portal),
        "LANG": lang,
        "APP_SID": secrets.token_hex(16),
    }
    form = {
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
    separator = "&" if urlsplit(url).query else "?"
    return {
        "url": f"{url}{separator}{urlencode(query)}",
        "action": url,
        "query": query,
        "form": form,
        "portal": portal.name,
        "user_id": user_id,
        "installed": portal.installed,
        "installer": installer,
    }


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


# --------------------------------------------------------------------------------------------
# portal-level actions


def _rename(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    new_name = str(params.get("new_name") or "").strip().lower()
    if not _NAME_RE.match(new_name):
        raise ControlError(400, "new_name must match [a-z0-9][a-z0-9-]*")
    if new_name == portal.name:
        raise ControlError(400, "new_name equals the current name")
    if new_name in state.portals:
        raise ControlError(409, f"portal {new_name} already exists")
    old = portal.name
    try:
        state.rename(portal, new_name)
    except OSError as exc:
        raise ControlError(503, f"cannot listen on a new host for the portal: {exc}") from exc
    return {"old_name": old, "portal": state.portal_snapshot(portal)}


def _set_pins(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    user_id = _user_id(portal, params, default=None)
    raw_ids = params.get("flow_ids")
    if not isinstance(raw_ids, list):
        raise ControlError(400, "flow_ids must be a list")
    try:
        flow_ids = [int(v) for v in raw_ids]
    except (TypeError, ValueError) as exc:
        raise ControlError(400, "flow_ids must be integers") from exc
    unknown = [fid for fid in flow_ids if fid not in portal.flows]
    if unknown:
        raise ControlError(400, f"unknown flow ids: {unknown}")
    pinned = _bool_param(params, "pinned", True)
    pins = portal.pins.setdefault(user_id, set())
    for fid in flow_ids:
        if pinned:
            pins.add(fid)
        else:
            pins.discard(fid)
        state.record_pin(portal, user_id, fid, pinned, "portal")
    return {"user_id": user_id, "pinned": portal.pinned(user_id)}


def _generate_users(
    state: SandboxState, portal: Portal, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Ordinary employees (department 1, not admins), numbered after the last user."""
    count = _int_param(params, "count", 100)
    if not 0 <= count <= 5000:
        raise ControlError(400, "count must be within 0..5000")
    first = max(portal.users) + 1
    for uid in range(first, first + count):
        portal.users[uid] = User(uid, "Bench", f"User {uid}", departments=[1])
    return {"users": list(range(first, first + count))}


def _generate_flows(
    state: SandboxState, portal: Portal, params: Mapping[str, Any]
) -> dict[str, Any]:
    count = _int_param(params, "count", 100)
    if not 0 <= count <= 20000:
        raise ControlError(400, "count must be within 0..20000")
    if _bool_param(params, "replace"):
        portal.flows = {}
        portal.tasks = {t.id: t for t in portal.tasks.values() if t.flow_id == 0}
        for pins in portal.pins.values():
            pins.clear()
    visible_to_all = _bool_param(params, "visible_to_all")
    access = params.get("access")
    if access is not None and (
        not isinstance(access, list) or not all(isinstance(a, str) for a in access)
    ):
        raise ControlError(400, "access must be a list of access codes like ['UA', 'U2', 'D10']")
    tasks_per_flow = _int_param(params, "tasks_per_flow", 0)
    prefix = str(params.get("name_prefix") or "Сгенерированный поток")
    active = _bool_param(params, "active", True)
    first = portal.next_flow_id()
    rng = random.Random(f"{portal.seed_name}:{first}:{count}")  # noqa: S311 - test data
    choices = [["UA"], ["U2"], ["U3"], ["D10"], ["D20", "U4"], ["DR20"], ["U2", "U3"]]
    created: list[int] = []
    now = state.clock()
    for offset in range(count):
        fid = first + offset
        codes = ["UA"] if visible_to_all else list(access) if access else list(rng.choice(choices))
        flow = Flow(
            id=fid,
            name=f"{prefix} {fid}",
            description=f"Поток {fid}, создан для нагрузочного теста",
            active=active,
            efficiency=rng.randint(0, 100),
            group_id=0,
            owner_id=1,
            creator_id=1,
            distribution_type=rng.choice(["manually", "queue", "himself"]),
            planned_completion_time=86400,
            activity=iso(now),
            demo=False,
            access=codes,
            responsible=[1],
        )
        portal.flows[fid] = flow
        created.append(fid)
        for n in range(tasks_per_flow):
            tid = portal.next_task_id()
            portal.tasks[tid] = Task(
                id=tid,
                title=f"Задача {n + 1} потока {fid}",
                description="",
                flow_id=fid,
                created_by=1,
                responsible_id=1 + (n % 3),
                group_id=0,
                status=2,
                priority=1,
                created_date=iso(now),
                changed_date=iso(now),
            )
    return {
        "created": len(created),
        "first_id": created[0] if created else None,
        "total": len(portal.flows),
    }


def _access(params: Mapping[str, Any], default: list[str] | None = None) -> list[str]:
    access = params.get("access", default)
    if not isinstance(access, list) or not all(isinstance(a, str) for a in access):
        raise ControlError(400, "access must be a list of access codes like ['UA', 'U2', 'D10']")
    return list(access)


def _edit_flow(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    """One flow created, changed or deleted, as a person editing flows in Bitrix24 does."""
    if params.get("id") is None:
        fid = portal.next_flow_id()
        flow = Flow(
            id=fid,
            name=str(params.get("name") or f"Поток {fid}"),
            description="",
            active=_bool_param(params, "active", True),
            efficiency=_int_param(params, "efficiency", 100),
            group_id=0,
            owner_id=1,
            creator_id=1,
            distribution_type="manually",
            planned_completion_time=86400,
            activity=iso(state.clock()),
            demo=False,
            access=_access(params, ["UA"]),
            responsible=[1],
        )
        portal.flows[fid] = flow
        return {"created": fid, "flow": asdict(flow)}
    fid = _int_param(params, "id")
    existing = portal.flows.get(fid)
    if existing is None:
        raise ControlError(404, f"no flow {fid}")
    if _bool_param(params, "delete"):
        del portal.flows[fid]
        for pins in portal.pins.values():
            pins.discard(fid)
        for task in portal.tasks.values():
            if task.flow_id == fid:
                task.flow_id = 0
        return {"deleted": fid}
    if params.get("name") is not None:
        existing.name = str(params["name"])
    if params.get("active") is not None:
        existing.active = _bool_param(params, "active")
    if params.get("efficiency") is not None:
        existing.efficiency = _int_param(params, "efficiency")
    if params.get("access") is not None:
        existing.access = _access(params)
    return {"updated": fid, "flow": asdict(existing)}


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


# --------------------------------------------------------------------------------------------
# routing

PortalAction = Callable[[SandboxState, Portal, Mapping[str, Any]], dict[str, Any]]


def _install_finish(
    state: SandboxState, portal: Portal, params: Mapping[str, Any]
) -> dict[str, Any]:
    state.ensure_application_token(portal)
    portal.installed = True
    return {"installed": True, "application_token": portal.application_token}


def _expire(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    user_id = _user_id(portal, params) if params.get("user_id") is not None else None
    return {"expired": state.expire_tokens(portal, user_id)}


def _tokens(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    pair = state.issue_tokens(portal, _user_id(portal, params))
    return state.token_body(pair, portal)


_PORTAL_ACTIONS: dict[str, PortalAction] = {
    "install_finish": _install_finish,
    "expire": _expire,
    "rename": _rename,
    "pins": _set_pins,
    "flows": _generate_flows,
    "flow": _edit_flow,
    "users": _generate_users,
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
    if path == "reset":
        _require_post(http_method)
        state.reset(keep_knobs=_bool_param(params, "keep_knobs"))
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
    deliver = _bool_param(params, "deliver", True)
    forge = _bool_param(params, "forge")
    with state.lock:
        portal = _portal(state, name)
        version = params.get("version")
        app_token = params.get("application_token")
        try:
            deliveries = events.prepare(
                state,
                portal,
                str(params.get("event") or ""),
                clean=1 if _bool_param(params, "clean") else 0,
                handler=str(params.get("handler") or "") or None,
                rotate_application_token=_bool_param(params, "rotate_application_token"),
                user_id=_user_id(portal, params),
                version=int(version) if version is not None else None,
                fallback=_bool_param(params, "fallback", True),
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
