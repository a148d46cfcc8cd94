"""Task flows: ``tasks.flow.Flow.get``, ``.pin`` and the undocumented ``.list``.

Controller actions: registered in camel case only, parameters bound by exact name
(``flowId``, ``select``, ``filter``, ``order``, ``start``); errors are ``{"error": "0"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..model import Flow
from ..query import matches, split_filter_key
from ..wire import RestError
from .common import PAGE_SIZE, CallContext, as_int, field_list, sorter, start_offset

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
    flow_id = as_int(raw_id)
    flow = ctx.portal.flows.get(flow_id) if flow_id is not None else None
    if flow is None or not ctx.portal.can_see_flow(ctx.user, flow):
        raise _flow_error(status)
    return flow


def flow_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    if "flowId" not in params:
        raise _flow_error(400, "Could not find value for parameter {flowId}")
    return flow_object(_visible_flow(ctx, params["flowId"]))


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


def flow_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    """Undocumented list action: plain array, page of 50 via ``start``, no total/next."""
    select = field_list(params.get("select"))
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
        flows.sort(key=sorter(flow_getter), reverse=descending)
    start = max(start_offset(params), 0)
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
