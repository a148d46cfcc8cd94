"""Widget placements: ``placement.list``, ``.bind``, ``.unbind`` and ``.get``.

Admin only (403 ``ACCESS_DENIED``), except ``placement.list``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..model import PlacementBinding, TokenPair
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

# code -> (scope that provides it, max handlers per app; 0 = unlimited)
PLACEMENTS: dict[str, tuple[str, int]] = {
    "REST_APP_URI": ("placement", 1),
    "PAGE_BACKGROUND_WORKER": ("placement", 1),
    "LEFT_MENU": ("placement", 0),
    "USER_PROFILE_MENU": ("placement", 0),
    "USER_PROFILE_TOOLBAR": ("placement", 0),
    "TASK_LIST_CONTEXT_MENU": ("task", 0),
    "TASK_USER_LIST_TOOLBAR": ("task", 0),
    "TASK_GROUP_LIST_TOOLBAR": ("task", 0),
    "TASK_ROBOT_DESIGNER_TOOLBAR": ("task", 0),
    "TASK_VIEW_TAB": ("task", 0),
    "TASK_VIEW_SIDEBAR": ("task", 0),
    "TASK_VIEW_TOP_PANEL": ("task", 0),
    "TASK_VIEW_MODE": ("task", 0),
    "TASK_TOP_MENU": ("task", 0),
}


def _available_placements(token: TokenPair) -> list[str]:
    granted = {s.strip() for s in token.scope.split(",")}
    return [code for code, (scope, _) in PLACEMENTS.items() if scope in granted]


def _placement_code(p: dict[str, Any]) -> str:
    raw = p.get("PLACEMENT")
    if raw is not None and not isinstance(raw, str):
        raise RestError(400, "ERROR_ARGUMENT", "Argument 'PLACEMENT' must be of type string")
    return (raw or "").upper()


def placement_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    return _available_placements(ctx.token)


def placement_bind(ctx: CallContext, params: dict[str, Any]) -> Any:
    require_admin(ctx)
    p = upper_keys(params)
    code = _placement_code(p)
    handler = as_text(p.get("HANDLER"))
    if code == "":
        raise RestError(400, "ERROR_ARGUMENT", "The placement code is not specified")
    if code == "DEFAULT":
        raise RestError(400, "ERROR_ARGUMENT", "The placement code has an incorrect value")
    if handler == "":
        raise RestError(400, "ERROR_ARGUMENT", "The URL of the placement handler is not specified")
    check_handler_url(handler, ctx.knobs)
    if code not in _available_placements(ctx.token):
        raise RestError(400, "ERROR_PLACEMENT_NOT_FOUND", "Placement not found")
    user_id = as_int(p.get("USER_ID")) or 0
    if user_id > 0 and code != "PAGE_BACKGROUND_WORKER":
        raise RestError(400, "ERROR_PLACEMENT_USER_MODE", "User mode is not available.")
    max_count = PLACEMENTS[code][1]
    existing = [b for b in ctx.portal.placements if b.placement == code]
    if max_count and len(existing) >= max_count:
        raise RestError(400, "ERROR_PLACEMENT_MAX_COUNT", f"Placement max count: {max_count}")
    if any(b.handler == handler for b in existing):
        raise RestError(
            400, "ERROR_CORE", "Unable to set placement handler: Handler already binded"
        )
    options = p.get("OPTIONS")
    lang_all_raw = p.get("LANG_ALL")
    lang_all: dict[str, dict[str, str]] = {}
    if isinstance(lang_all_raw, Mapping):
        for lang, item in lang_all_raw.items():
            if isinstance(item, Mapping):
                lang_all[str(lang)] = {
                    f: as_text(item.get(f)).strip() for f in ("TITLE", "DESCRIPTION", "GROUP_NAME")
                }
    title = as_text(p.get("TITLE")).strip()
    if not title and lang_all:
        title = next(iter(lang_all.values())).get("TITLE", "")
    ctx.portal.placements.append(
        PlacementBinding(
            id=ctx.portal.new_binding_id(),
            placement=code,
            handler=handler,
            title=title,
            description=as_text(p.get("DESCRIPTION")).strip(),
            user_id=user_id,
            options=dict(options) if isinstance(options, Mapping) else {},
            lang_all=lang_all,
        )
    )
    return True


def placement_unbind(ctx: CallContext, params: dict[str, Any]) -> Any:
    require_admin(ctx)
    p = upper_keys(params)
    code = _placement_code(p)
    if not code:
        raise argument_null("PLACEMENT")
    handler = as_text(p.get("HANDLER"))
    user_filter = as_int(p.get("USER_ID")) if "USER_ID" in p else None
    ctx.portal.placements, count = without(
        ctx.portal.placements,
        lambda b: b.placement == code and (not handler or b.handler == handler),
        user_filter,
    )
    return {"count": count}


def placement_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    require_admin(ctx)
    return [
        {
            "id": str(b.id),
            "placement": b.placement,
            "userId": str(b.user_id),
            "handler": b.handler,
            "options": b.options or [],
            "title": b.title,
            "description": b.description,
            "langAll": b.lang_all or [],
        }
        for b in ctx.portal.placements
    ]
