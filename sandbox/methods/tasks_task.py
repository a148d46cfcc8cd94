"""Tasks: ``tasks.task.list`` and ``tasks.task.get`` (parameters bound by exact name)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..model import Task
from ..query import matches, split_filter_key
from ..wire import RestError
from .common import PAGE_SIZE, CallContext, MethodResult, as_int, field_list, sorter, start_offset


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
    fields = field_list(raw)
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
        tasks.sort(key=sorter(task_getter), reverse=descending)
    start = start_offset(params)
    if start == -1:
        page = tasks[:PAGE_SIZE]
        return MethodResult({"tasks": [task_object(t, select) for t in page]})
    page = tasks[start : start + PAGE_SIZE]
    total = len(tasks)
    next_start = start + PAGE_SIZE if start + PAGE_SIZE < total else None
    return MethodResult(
        {"tasks": [task_object(t, select) for t in page]}, total=total, next=next_start
    )


def task_get(ctx: CallContext, params: dict[str, Any]) -> Any:
    """Unknown or invisible task: ``result: []`` with HTTP 200 (as the docs say)."""
    if "taskId" not in params or params["taskId"] in (None, ""):
        raise RestError(
            400,
            "100",
            "CTaskItem All parameters in the constructor must have real class type"
            " (internal error)",
        )
    task_id = as_int(params["taskId"])
    if task_id is None or task_id <= 0:
        raise RestError(400, "0", "wrong task id")
    task = ctx.portal.tasks.get(task_id)
    if task is None or not ctx.portal.can_see_task(ctx.user, task):
        return []
    select = _task_select(params.get("select"))
    return {"task": task_object(task, select)}
