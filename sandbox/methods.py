"""Portal REST method handlers and the method registry.

Lookup mirrors the core's REST entry point: the name is tried lower-cased first (classic
methods are registered lower-case, so ``PROFILE`` works), then exactly as sent. The
``tasks.flow.Flow.*`` controller actions are registered only in camel case, so
``tasks.flow.flow.pin`` is ``ERROR_METHOD_NOT_FOUND`` while ``tasks.flow.Flow.pin`` works.

Parameter names: classic methods (placement.*, event.*, batch) upper-case their parameter
keys like the core's ``array_change_key_case``; the engine-controller methods
(``tasks.flow.Flow.*``, ``tasks.task.*``) bind parameters by exact name (``flowId``,
``taskId``, ``select``, ``filter``, ``order``, ``start``).

Error choices (taken from the core sources and the method pages of the docs):

* duplicate ``placement.bind`` -> 400 ``ERROR_CORE`` "Unable to set placement handler: Handler
  already binded"; duplicate ``event.bind`` -> 400 ``ERROR_CORE`` "Unable to set event
  handler: Handler already binded" (what the core throws; the docs' generic error table shows
  ``ERROR_HANDLER_ALREADY_EXIST`` instead).
* handler URLs must be http(s) with a dotted host (``ERROR_WRONG_HANDLER_URL`` /
  ``ERROR_UNSUPPORTED_PROTOCOL``), so ``http://localhost:8000/...`` is refused while
  ``http://127.0.0.1:8000/...`` is accepted (knob ``handler_url_check``).
* flow errors are ``{"error": "0", ...}`` with HTTP 400 (pin: knob ``pin_error_status``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .knobs import Knobs
from .model import (
    APP_CODE,
    APP_STATUS,
    LOCAL_APP_ID,
    EventBinding,
    Flow,
    PlacementBinding,
    Portal,
    Task,
    TokenPair,
    User,
)
from .query import as_list, matches, sort_key, split_filter_key
from .state import SandboxState
from .wire import RestError

PAGE_SIZE = 50
_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# registry


@dataclass
class CallContext:
    """Everything a method handler may need for one (sub-)call."""

    state: SandboxState
    portal: Portal
    user: User
    token: TokenPair
    knobs: Knobs
    now: float
    drop_response: bool = False  # set by a handler to lose the HTTP response
    in_batch: bool = False


@dataclass
class MethodResult:
    result: Any
    total: int | None = None
    next: int | None = None


Handler = Callable[[CallContext, dict[str, Any]], Any]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    handler: Handler
    scopes: frozenset[str]  # empty: scope "basic", always granted
    counts_operating: bool = True


REGISTRY: dict[str, MethodSpec] = {}


def method(
    name: str, *, scopes: tuple[str, ...] = (), case_sensitive: bool = False, operating: bool = True
) -> Callable[[Handler], Handler]:
    """Register a handler (lower-case key unless ``case_sensitive``)."""

    def register(fn: Handler) -> Handler:
        key = name if case_sensitive else name.lower()
        REGISTRY[key] = MethodSpec(name, fn, frozenset(scopes), operating)
        return fn

    return register


def find_method(name: str, knobs: Knobs) -> MethodSpec | None:
    spec = REGISTRY.get(name.lower()) or REGISTRY.get(name)
    if spec is not None and spec.name == "tasks.flow.Flow.list" and not knobs.flow_list_enabled:
        return None
    return spec


def has_scope(granted: str, required: frozenset[str]) -> bool:
    if not required:
        return True
    return bool(required.intersection(s.strip() for s in granted.split(",")))


# --------------------------------------------------------------------------------------------
# helpers


def upper_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in params.items()}


def _text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _require_admin(ctx: CallContext, detail: str = "") -> None:
    if not ctx.user.admin:
        raise RestError(403, "ACCESS_DENIED", "Access denied!" + (f" {detail}" if detail else ""))


def _argument_null(name: str) -> RestError:
    return RestError(400, "ERROR_ARGUMENT", f"Argument '{name}' is null or empty")


def check_handler_url(url: str, knobs: Knobs) -> None:
    """``HandlerHelper::checkCallback``: a host containing a dot, scheme http or https."""
    if not knobs.handler_url_check:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or host.find(".") <= 0:
        raise RestError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    if parts.scheme not in ("http", "https"):
        raise RestError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")


def _start(params: Mapping[str, Any]) -> int:
    value = _int(params.get("start"))
    if value is None:
        return 0
    return value if value == -1 else max(value, 0)


# --------------------------------------------------------------------------------------------
# basic scope: profile, users, app.info


@method("profile")
def profile(ctx: CallContext, params: dict[str, Any]) -> Any:
    u = ctx.user
    return {
        "ID": str(u.id),
        "ADMIN": u.admin,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "PERSONAL_GENDER": u.gender,
        "TIME_ZONE": "",
    }


@method("user.admin")
def user_admin(ctx: CallContext, params: dict[str, Any]) -> Any:
    return ctx.user.admin


@method("user.current", scopes=("user", "user_brief", "user_basic"))
def user_current(ctx: CallContext, params: dict[str, Any]) -> Any:
    u = ctx.user
    return {
        "ID": str(u.id),
        "XML_ID": None,
        "ACTIVE": True,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "SECOND_NAME": "",
        "EMAIL": u.email or f"user{u.id}@{ctx.portal.domain}",
        "PERSONAL_GENDER": u.gender,
        "IS_ONLINE": "N",
        "TIME_ZONE": "",
        "UF_DEPARTMENT": list(u.departments),
        "USER_TYPE": "extranet" if u.extranet else "employee",
    }


@method("app.info")
def app_info(ctx: CallContext, params: dict[str, Any]) -> Any:
    return {
        "ID": LOCAL_APP_ID,
        "CODE": APP_CODE,
        "VERSION": ctx.portal.app_version,
        "STATUS": APP_STATUS,
        "INSTALLED": ctx.portal.installed,
        "PAYMENT_EXPIRED": "Y" if ctx.knobs.payment_expired else "N",
        "DAYS": None,
        "LANGUAGE_ID": ctx.portal.language,
        "LICENSE": f"{ctx.portal.language}_project",
        "LICENSE_TYPE": "project",
        "LICENSE_FAMILY": "project",
    }


@method("scope")
def scope_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    return [s for s in ctx.token.scope.split(",") if s]


# --------------------------------------------------------------------------------------------
# placements

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


_Binding = TypeVar("_Binding", PlacementBinding, EventBinding)


def _without(
    bindings: list[_Binding], match: Callable[[_Binding], bool], user_id: int | None
) -> tuple[list[_Binding], int]:
    """The bindings an unbind leaves, and how many it removed (of one user's, if given)."""
    keep = [b for b in bindings if not (match(b) and (user_id is None or b.user_id == user_id))]
    return keep, len(bindings) - len(keep)


def _placement_code(p: dict[str, Any]) -> str:
    raw = p.get("PLACEMENT")
    if raw is not None and not isinstance(raw, str):
        raise RestError(400, "ERROR_ARGUMENT", "Argument 'PLACEMENT' must be of type string")
    return (raw or "").upper()


@method("placement.list", scopes=("placement",))
def placement_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    return _available_placements(ctx.token)


@method("placement.bind", scopes=("placement",))
def placement_bind(ctx: CallContext, params: dict[str, Any]) -> Any:
    _require_admin(ctx)
    p = upper_keys(params)
    code = _placement_code(p)
    handler = _text(p.get("HANDLER"))
    if code == "":
        raise RestError(400, "ERROR_ARGUMENT", "The placement code is not specified")
    if code == "DEFAULT":
        raise RestError(400, "ERROR_ARGUMENT", "The placement code has an incorrect value")
    if handler == "":
        raise RestError(400, "ERROR_ARGUMENT", "The URL of the placement handler is not specified")
    check_handler_url(handler, ctx.knobs)
    if code not in _available_placements(ctx.token):
        raise RestError(400, "ERROR_PLACEMENT_NOT_FOUND", "Placement not found")
    user_id = _int(p.get("USER_ID")) or 0
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
                    f: _text(item.get(f)).strip() for f in ("TITLE", "DESCRIPTION", "GROUP_NAME")
                }
    title = _text(p.get("TITLE")).strip()
    if not title and lang_all:
        title = next(iter(lang_all.values())).get("TITLE", "")
    ctx.portal.placements.append(
        PlacementBinding(
            id=ctx.portal.new_binding_id(),
            placement=code,
            handler=handler,
            title=title,
            description=_text(p.get("DESCRIPTION")).strip(),
            user_id=user_id,
            options=dict(options) if isinstance(options, Mapping) else {},
            lang_all=lang_all,
        )
    )
    return True


@method("placement.unbind", scopes=("placement",))
def placement_unbind(ctx: CallContext, params: dict[str, Any]) -> Any:
    _require_admin(ctx)
    p = upper_keys(params)
    code = _placement_code(p)
    if not code:
        raise _argument_null("PLACEMENT")
    handler = _text(p.get("HANDLER"))
    user_filter = _int(p.get("USER_ID")) if "USER_ID" in p else None
    ctx.portal.placements, count = _without(
        ctx.portal.placements,
        lambda b: b.placement == code and (not handler or b.handler == handler),
        user_filter,
    )
    return {"count": count}


@method("placement.get", scopes=("placement",))
def placement_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    _require_admin(ctx)
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


# --------------------------------------------------------------------------------------------
# events

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


@method("events")
def events_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    granted = {s.strip() for s in ctx.token.scope.split(",")} | {""}
    return [name for name, scope in EVENTS.items() if scope in granted]


@method("event.bind")
def event_bind(ctx: CallContext, params: dict[str, Any]) -> Any:
    """``CRestEvent::eventBind``: a non-admin may bind, but only for themselves."""
    p = upper_keys(params)
    name = _text(p.get("EVENT")).upper()
    event_type = _text(p.get("EVENT_TYPE")).lower()
    auth_type = _int(p.get("AUTH_TYPE")) or 0
    handler = _text(p.get("HANDLER"))
    if auth_type > 0:
        if not ctx.user.admin and auth_type != ctx.user.id:
            _require_admin(ctx, "Event binding with AUTH_TYPE requires administrator access rights")
    elif not ctx.user.admin:
        auth_type = ctx.user.id
    if not name:
        raise _argument_null("EVENT")
    if event_type and event_type not in ("online", "offline"):
        raise RestError(400, "ERROR_ARGUMENT", "Value must be one of {online|offline}")
    offline = event_type == "offline"
    if offline:
        _require_admin(ctx, "Offline events binding requires administrator access rights")
        handler, auth_type = "", 0
    elif not handler:
        raise _argument_null("HANDLER")
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


@method("event.unbind")
def event_unbind(ctx: CallContext, params: dict[str, Any]) -> Any:
    p = upper_keys(params)
    name = _text(p.get("EVENT")).upper()
    event_type = _text(p.get("EVENT_TYPE")).lower()
    handler = _text(p.get("HANDLER"))
    if not name:
        raise _argument_null("EVENT")
    if event_type and event_type not in ("online", "offline"):
        raise RestError(400, "ERROR_ARGUMENT", "Value must be one of {online|offline}")
    offline = event_type == "offline"
    user_filter: int | None = None
    if offline:
        _require_admin(ctx, "Offline events unbinding requires administrator access rights")
        handler = ""
    else:
        if not handler:
            raise _argument_null("HANDLER")
        if "AUTH_TYPE" in p:
            requested = _int(p.get("AUTH_TYPE")) or 0
            if not ctx.user.admin and requested != ctx.user.id:
                _require_admin(
                    ctx, "Event unbinding with AUTH_TYPE requires administrator access rights"
                )
            user_filter = requested
        elif not ctx.user.admin:
            user_filter = ctx.user.id
    ctx.portal.events, count = _without(
        ctx.portal.events,
        lambda b: b.event == name and b.handler == handler and b.offline == offline,
        user_filter,
    )
    return {"count": count}


@method("event.get")
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


# --------------------------------------------------------------------------------------------
# task flows

FLOW_ERROR = "Access denied or flow not found"

# FlowTable field -> (camelCase key, getter)
FLOW_FIELDS: dict[str, tuple[str, Callable[[Flow], Any]]] = {
    "ID": ("id", lambda f: f.id),
    "CREATOR_ID": ("creatorId", lambda f: f.creator_id),
    "OWNER_ID": ("ownerId", lambda f: f.owner_id),
    "GROUP_ID": ("groupId", lambda f: f.group_id),
    "TEMPLATE_ID": ("templateId", lambda f: f.template_id),
    "EFFICIENCY": ("efficiency", lambda f: f.efficiency),
    "ACTIVE": ("active", lambda f: f.active),
    "PLANNED_COMPLETION_TIME": ("plannedCompletionTime", lambda f: f.planned_completion_time),
    "ACTIVITY": ("activity", lambda f: f.activity),
    "NAME": ("name", lambda f: f.name),
    "DESCRIPTION": ("description", lambda f: f.description),
    "DISTRIBUTION_TYPE": ("distributionType", lambda f: f.distribution_type),
    "DEMO": ("demo", lambda f: f.demo),
}


def _member_ref(code: str) -> list[str]:
    if code == "UA":
        return ["meta-user", "all-users"]
    if code.startswith("DR"):
        return ["department", code[2:]]
    if code.startswith("D"):
        return ["department", f"{code[1:]}:F"]
    return ["user", code[1:]]


def flow_object(flow: Flow) -> dict[str, Any]:
    """The full flow object of ``tasks.flow.Flow.get`` (brief §7.1); no pinned flag."""
    return {
        "id": flow.id,
        "creatorId": flow.creator_id,
        "ownerId": flow.owner_id,
        "groupId": flow.group_id,
        "templateId": flow.template_id,
        "efficiency": flow.efficiency,
        "active": flow.active,
        "plannedCompletionTime": flow.planned_completion_time,
        "activity": flow.activity,
        "name": flow.name,
        "description": flow.description,
        "distributionType": flow.distribution_type,
        "responsibleList": [["user", str(uid)] for uid in flow.responsible],
        "demo": flow.demo,
        "responsibleCanChangeDeadline": True,
        "matchWorkTime": True,
        "taskControl": False,
        "notifyAtHalfTime": False,
        "notifyOnQueueOverflow": 10 if flow.distribution_type == "queue" else None,
        "notifyOnTasksInProgressOverflow": 50,
        "notifyWhenEfficiencyDecreases": None,
        "taskCreators": [_member_ref(code) for code in flow.access],
        "team": [["user", str(uid)] for uid in flow.responsible],
        "trialFeatureEnabled": False,
    }


def _flow_error(status: int = 400, text: str = FLOW_ERROR) -> RestError:
    return RestError(status, "0", text)


def _visible_flow(ctx: CallContext, raw_id: Any, status: int = 400) -> Flow:
    flow_id = _int(raw_id)
    flow = ctx.portal.flows.get(flow_id) if flow_id is not None else None
    if flow is None or not ctx.portal.can_see_flow(ctx.user, flow):
        raise _flow_error(status)
    return flow


@method("tasks.flow.Flow.get", scopes=("task",), case_sensitive=True)
def flow_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    if "flowId" not in params:
        raise _flow_error(400, "Could not find value for parameter {flowId}")
    return flow_object(_visible_flow(ctx, params["flowId"]))


@method("tasks.flow.Flow.pin", scopes=("task",), case_sensitive=True)
def flow_pin(ctx: CallContext, params: dict[str, Any]) -> Any:
    """Per-user toggle: flips the token owner's flag and returns the new value."""
    status = ctx.knobs.pin_error_status
    if "flowId" not in params:
        raise _flow_error(status, "Could not find value for parameter {flowId}")
    flow = _visible_flow(ctx, params["flowId"], status)
    pins = ctx.portal.pins.setdefault(ctx.user.id, set())
    new_value = flow.id not in pins
    if new_value:
        pins.add(flow.id)
    else:
        pins.discard(flow.id)
    ctx.portal.counters.pin_toggles += 1
    dropped = ctx.state.roll(ctx.knobs.pin_drop_ratio)
    if dropped:
        ctx.drop_response = True
    ctx.state.record_pin(
        ctx.portal, ctx.user.id, flow.id, new_value, "rest-dropped" if dropped else "rest"
    )
    if ctx.knobs.malformed_answers:  # applied, but the answer cannot be read as a state
        return "maybe"
    return new_value


def _sorter(getter: Callable[[_T], Any]) -> Callable[[_T], tuple[int, Any]]:
    def key(item: _T) -> tuple[int, Any]:
        return sort_key(getter(item))

    return key


def _field_list(raw: Any) -> list[str]:
    if raw is None or raw == "":
        return []
    return [str(v).upper() for v in as_list(raw)]


@method("tasks.flow.Flow.list", scopes=("task",), case_sensitive=True)
def flow_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    """Undocumented list action: plain array, page of 50 via ``start``, no total/next."""
    select = _field_list(params.get("select"))
    if "*" in select or not select:
        select = list(FLOW_FIELDS)
    if any(f not in FLOW_FIELDS for f in select):
        raise _flow_error(400, "Invalid select data")
    if "ID" not in select:
        select.insert(0, "ID")
    raw_filter = params.get("filter") or {}
    if not isinstance(raw_filter, Mapping):
        raise _flow_error(400, "Invalid filter data")
    conditions = []
    for key, expected in raw_filter.items():
        op, name = split_filter_key(str(key))
        if name not in FLOW_FIELDS:
            raise _flow_error(400, "Invalid filter data")
        conditions.append((FLOW_FIELDS[name][1], op, expected))
    raw_order = params.get("order") or {"ID": "ASC"}
    if not isinstance(raw_order, Mapping):
        raise _flow_error(400, "Incorrect sort field")
    order: list[tuple[Callable[[Flow], Any], bool]] = []
    for key, direction in raw_order.items():
        name = str(key).upper()
        if name not in FLOW_FIELDS or str(direction).upper() not in ("ASC", "DESC"):
            raise _flow_error(400, "Incorrect sort field")
        order.append((FLOW_FIELDS[name][1], str(direction).upper() == "DESC"))
    flows = [
        f
        for f in ctx.portal.visible_flows(ctx.user)
        if all(matches(getter(f), op, exp) for getter, op, exp in conditions)
    ]
    for flow_getter, descending in reversed(order):
        flows.sort(key=_sorter(flow_getter), reverse=descending)
    start = max(_start(params), 0)
    page = flows[start : start + PAGE_SIZE]
    result = []
    for flow in page:
        item = {}
        for name in select:
            key, getter = FLOW_FIELDS[name]
            value = getter(flow)
            if value is not None:
                item[key] = value
        result.append(item)
    return result


# --------------------------------------------------------------------------------------------
# tasks


def _opt_str(value: int) -> str | None:
    return str(value) if value else None


# select field -> (output key, getter)
TASK_FIELDS: dict[str, tuple[str, Callable[[Task], Any]]] = {
    "ID": ("id", lambda t: str(t.id)),
    "TITLE": ("title", lambda t: t.title),
    "DESCRIPTION": ("description", lambda t: t.description),
    "STATUS": ("status", lambda t: str(t.status)),
    "PRIORITY": ("priority", lambda t: str(t.priority)),
    "RESPONSIBLE_ID": ("responsibleId", lambda t: str(t.responsible_id)),
    "CREATED_BY": ("createdBy", lambda t: str(t.created_by)),
    "GROUP_ID": ("groupId", lambda t: str(t.group_id)),
    "FLOW_ID": ("flowId", lambda t: _opt_str(t.flow_id)),
    "CREATED_DATE": ("createdDate", lambda t: t.created_date),
    "CHANGED_DATE": ("changedDate", lambda t: t.changed_date),
    "DEADLINE": ("deadline", lambda t: t.deadline),
    "ACCOMPLICES": ("accomplices", lambda t: [str(u) for u in t.accomplices]),
    "AUDITORS": ("auditors", lambda t: [str(u) for u in t.auditors]),
}
TASK_DEFAULT_SELECT = [f for f in TASK_FIELDS if f not in ("ACCOMPLICES", "AUDITORS")]

# filter field -> raw value getter (lists match if any element matches)
TASK_FILTERS: dict[str, Callable[[Task], Any]] = {
    "ID": lambda t: t.id,
    "TITLE": lambda t: t.title,
    "STATUS": lambda t: t.status,
    "REAL_STATUS": lambda t: t.status,
    "PRIORITY": lambda t: t.priority,
    "RESPONSIBLE_ID": lambda t: t.responsible_id,
    "CREATED_BY": lambda t: t.created_by,
    "GROUP_ID": lambda t: t.group_id,
    "FLOW_ID": lambda t: t.flow_id,
    "FLOW": lambda t: t.flow_id,
    "ACCOMPLICE": lambda t: list(t.accomplices),
    "AUDITOR": lambda t: list(t.auditors),
    "MEMBER": lambda t: [t.created_by, t.responsible_id, *t.accomplices, *t.auditors],
    "CREATED_DATE": lambda t: t.created_date,
    "CHANGED_DATE": lambda t: t.changed_date,
    "DEADLINE": lambda t: t.deadline,
}
TASK_SORTABLE: dict[str, Callable[[Task], Any]] = {
    "ID": lambda t: t.id,
    "TITLE": lambda t: t.title,
    "CREATED_DATE": lambda t: t.created_date,
    "CHANGED_DATE": lambda t: t.changed_date,
    "DEADLINE": lambda t: t.deadline,
    "REAL_STATUS": lambda t: t.status,
    "STATUS": lambda t: t.status,
    "PRIORITY": lambda t: t.priority,
    "GROUP_ID": lambda t: t.group_id,
}


def _task_select(raw: Any) -> list[str]:
    fields = _field_list(raw)
    if not fields:
        return list(TASK_DEFAULT_SELECT)
    if "*" in fields:
        return list(TASK_FIELDS)
    chosen = [f for f in fields if f in TASK_FIELDS]  # unknown fields are silently dropped
    if "ID" not in chosen:
        chosen.insert(0, "ID")
    return chosen


def task_object(task: Task, select: list[str]) -> dict[str, Any]:
    return {TASK_FIELDS[f][0]: TASK_FIELDS[f][1](task) for f in select}


@method("tasks.task.list", scopes=("task",))
def task_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    select = _task_select(params.get("select"))
    raw_filter = params.get("filter") or {}
    conditions = []
    if isinstance(raw_filter, Mapping):
        for key, expected in raw_filter.items():
            op, name = split_filter_key(str(key))
            getter = TASK_FILTERS.get(name)
            if getter is not None:  # unknown filter keys are ignored, like CTasks does
                conditions.append((getter, op, expected))
    raw_order = params.get("order") or {"ID": "DESC"}
    order: list[tuple[Callable[[Task], Any], bool]] = []
    if isinstance(raw_order, Mapping):
        for key, direction in raw_order.items():
            getter = TASK_SORTABLE.get(str(key).upper())
            if getter is None:
                raise RestError(400, "0", "Invalid sorting key")
            order.append((getter, str(direction).lower() == "desc"))
    tasks = [
        t
        for t in sorted(ctx.portal.tasks.values(), key=lambda t: t.id)
        if ctx.portal.can_see_task(ctx.user, t)
        and all(matches(getter(t), op, exp) for getter, op, exp in conditions)
    ]
    for task_getter, descending in reversed(order):
        tasks.sort(key=_sorter(task_getter), reverse=descending)
    start = _start(params)
    if start == -1:
        page = tasks[:PAGE_SIZE]
        return MethodResult({"tasks": [task_object(t, select) for t in page]})
    page = tasks[start : start + PAGE_SIZE]
    total = len(tasks)
    next_start = start + PAGE_SIZE if start + PAGE_SIZE < total else None
    return MethodResult(
        {"tasks": [task_object(t, select) for t in page]}, total=total, next=next_start
    )


@method("tasks.task.get", scopes=("task",))
def task_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    """Unknown or invisible task: ``result: []`` with HTTP 200 (as the docs say)."""
    if "taskId" not in params or params["taskId"] in (None, ""):
        raise RestError(
            400,
            "100",
            "CTaskItem All parameters in the constructor must have real class type"
            " (internal error)",
        )
    task_id = _int(params["taskId"])
    if task_id is None or task_id <= 0:
        raise RestError(400, "0", "wrong task id")
    task = ctx.portal.tasks.get(task_id)
    if task is None or not ctx.portal.can_see_task(ctx.user, task):
        return []
    select = _task_select(params.get("select"))
    return {"task": task_object(task, select)}
