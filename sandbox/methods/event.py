"""Event handlers: ``events``, ``event.bind``, ``event.unbind``, ``event.get``.

A non-admin may bind and unbind online events for themself only (``CRestEvent::eventBind``).
"""

from __future__ import annotations

from typing import Any

from ..model import EventBinding
from ..wire import RestError
from .common import (
    CallContext,
    argument_null,
    as_int,
    as_text,
    check_handler_url,
    require_admin,
    upper_keys,
    without,
)

# event -> scope that provides it ("" = basic)
EVENTS: dict[str, str] = {
    "ONAPPINSTALL": "",
    "ONAPPUNINSTALL": "",
    "ONAPPUPDATE": "",
    "ONAPPPAYMENT": "",
    "ONAPPTEST": "",
    "ONAPPMETHODCONFIRM": "",
    "ONSUBSCRIPTIONRENEW": "",
    "ONTASKADD": "task",
    "ONTASKUPDATE": "task",
    "ONTASKDELETE": "task",
    "ONTASKCOMMENTADD": "task",
    "ONTASKCOMMENTUPDATE": "task",
    "ONTASKCOMMENTDELETE": "task",
    "ONUSERADD": "user",
}


def events_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    granted = {s.strip() for s in ctx.token.scope.split(",")} | {""}
    return [name for name, scope in EVENTS.items() if scope in granted]


def event_bind(ctx: CallContext, params: dict[str, Any]) -> Any:
    """``CRestEvent::eventBind``: a non-admin may bind, but only for themselves."""
    p = upper_keys(params)
    name = as_text(p.get("EVENT")).upper()
    event_type = as_text(p.get("EVENT_TYPE")).lower()
    auth_type = as_int(p.get("AUTH_TYPE")) or 0
    handler = as_text(p.get("HANDLER"))
    if auth_type > 0:
        if not ctx.user.admin and auth_type != ctx.user.id:
            require_admin(ctx, "Event binding with AUTH_TYPE requires administrator access rights")
    elif not ctx.user.admin:
        auth_type = ctx.user.id
    if not name:
        raise argument_null("EVENT")
    if event_type and event_type not in ("online", "offline"):
        raise RestError(400, "ERROR_ARGUMENT", "Value must be one of {online|offline}")
    offline = event_type == "offline"
    if offline:
        require_admin(ctx, "Offline events binding requires administrator access rights")
        handler, auth_type = "", 0
    elif not handler:
        raise argument_null("HANDLER")
    if handler:
        check_handler_url(handler, ctx.knobs)
    granted = {s.strip() for s in ctx.token.scope.split(",")} | {""}
    if name not in EVENTS or EVENTS[name] not in granted:
        raise RestError(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
    for binding in ctx.portal.events:
        if (binding.event, binding.handler, binding.user_id, binding.offline) == (
            name,
            handler,
            auth_type,
            offline,
        ):
            raise RestError(
                400, "ERROR_CORE", "Unable to set event handler: Handler already binded"
            )
    ctx.portal.events.append(
        EventBinding(ctx.portal.new_binding_id(), name, handler, auth_type, offline=offline)
    )
    return True


def event_unbind(ctx: CallContext, params: dict[str, Any]) -> Any:
    p = upper_keys(params)
    name = as_text(p.get("EVENT")).upper()
    event_type = as_text(p.get("EVENT_TYPE")).lower()
    handler = as_text(p.get("HANDLER"))
    if not name:
        raise argument_null("EVENT")
    if event_type and event_type not in ("online", "offline"):
        raise RestError(400, "ERROR_ARGUMENT", "Value must be one of {online|offline}")
    offline = event_type == "offline"
    user_filter: int | None = None
    if offline:
        require_admin(ctx, "Offline events unbinding requires administrator access rights")
        handler = ""
    else:
        if not handler:
            raise argument_null("HANDLER")
        if "AUTH_TYPE" in p:
            requested = as_int(p.get("AUTH_TYPE")) or 0
            if not ctx.user.admin and requested != ctx.user.id:
                require_admin(
                    ctx, "Event unbinding with AUTH_TYPE requires administrator access rights"
                )
            user_filter = requested
        elif not ctx.user.admin:
            user_filter = ctx.user.id
    ctx.portal.events, count = without(
        ctx.portal.events,
        lambda b: b.event == name and b.handler == handler and b.offline == offline,
        user_filter,
    )
    return {"count": count}


def event_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    result: list[dict[str, Any]] = []
    for b in ctx.portal.events:
        if not ctx.user.admin and b.user_id != ctx.user.id:
            continue
        if b.offline:
            result.append({"event": b.event, "connector_id": "", "offline": 1})
        else:
            result.append(
                {"event": b.event, "handler": b.handler, "auth_type": str(b.user_id), "offline": 0}
            )
    return result
