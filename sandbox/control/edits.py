"""Portal edits, as a person in Bitrix24 or a benchmark set-up makes them.

Rename, pins, generated users and flows, and one flow created, changed or deleted.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ..model import Flow, Portal, Task, User, iso
from ..state import SandboxState
from .common import ControlError, bool_param, int_param, user_id_param

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


def rename(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
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


def set_pins(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    user_id = user_id_param(portal, params, default=None)
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
    pinned = bool_param(params, "pinned", True)
    pins = portal.pins.setdefault(user_id, set())
    for fid in flow_ids:
        if pinned:
            pins.add(fid)
        else:
            pins.discard(fid)
        state.record_pin(portal, user_id, fid, pinned, "portal")
    return {"user_id": user_id, "pinned": portal.pinned(user_id)}


def generate_users(
    state: SandboxState, portal: Portal, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Ordinary employees (department 1, not admins), numbered after the last user."""
    count = int_param(params, "count", 100)
    if not 0 <= count <= 5000:
        raise ControlError(400, "count must be within 0..5000")
    first = max(portal.users) + 1
    for uid in range(first, first + count):
        portal.users[uid] = User(uid, "Bench", f"User {uid}", departments=[1])
    return {"users": list(range(first, first + count))}


def generate_flows(
    state: SandboxState, portal: Portal, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Many flows for benchmarks (seeded by portal, first id and count), optionally with tasks."""
    count = int_param(params, "count", 100)
    if not 0 <= count <= 20000:
        raise ControlError(400, "count must be within 0..20000")
    visible_to_all = bool_param(params, "visible_to_all")
    access = params.get("access")
    if access is not None and (
        not isinstance(access, list) or not all(isinstance(a, str) for a in access)
    ):
        raise ControlError(400, "access must be a list of access codes like ['UA', 'U2', 'D10']")
    tasks_per_flow = int_param(params, "tasks_per_flow", 0)
    prefix = str(params.get("name_prefix") or "Сгенерированный поток")
    active = bool_param(params, "active", True)
    # Every parameter is checked before anything is cleared: a refused request changes nothing.
    if bool_param(params, "replace"):
        portal.flows = {}
        portal.tasks = {t.id: t for t in portal.tasks.values() if t.flow_id == 0}
        for pins in portal.pins.values():
            pins.clear()
    first = portal.next_flow_id()
    rng = random.Random(f"{portal.seed_name}:{first}:{count}")  # noqa: S311 - test data
    created: list[int] = []
    now = state.clock()
    for offset in range(count):
        fid = first + offset
        codes = ["UA"] if visible_to_all else list(access) if access else list(rng.choice(_ACCESS))
        portal.flows[fid] = _generated_flow(fid, f"{prefix} {fid}", active, codes, rng, now)
        created.append(fid)
        _add_flow_tasks(portal, fid, tasks_per_flow, now)
    return {
        "created": len(created),
        "first_id": created[0] if created else None,
        "total": len(portal.flows),
    }


_ACCESS = [["UA"], ["U2"], ["U3"], ["D10"], ["D20", "U4"], ["DR20"], ["U2", "U3"]]


def _generated_flow(
    fid: int, name: str, active: bool, codes: list[str], rng: random.Random, now: float
) -> Flow:
    return Flow(
        id=fid,
        name=name,
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


def _add_flow_tasks(portal: Portal, fid: int, count: int, now: float) -> None:
    for n in range(count):
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


def _access(params: Mapping[str, Any], default: list[str] | None = None) -> list[str]:
    access = params.get("access", default)
    if not isinstance(access, list) or not all(isinstance(a, str) for a in access):
        raise ControlError(400, "access must be a list of access codes like ['UA', 'U2', 'D10']")
    return list(access)


def edit_flow(state: SandboxState, portal: Portal, params: Mapping[str, Any]) -> dict[str, Any]:
    """One flow created, changed or deleted, as a person editing flows in Bitrix24 does."""
    if params.get("id") is None:
        fid = portal.next_flow_id()
        flow = Flow(
            id=fid,
            name=str(params.get("name") or f"Поток {fid}"),
            description="",
            active=bool_param(params, "active", True),
            efficiency=int_param(params, "efficiency", 100),
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
    fid = int_param(params, "id")
    existing = portal.flows.get(fid)
    if existing is None:
        raise ControlError(404, f"no flow {fid}")
    if bool_param(params, "delete"):
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
        existing.active = bool_param(params, "active")
    if params.get("efficiency") is not None:
        existing.efficiency = int_param(params, "efficiency")
    if params.get("access") is not None:
        existing.access = _access(params)
    return {"updated": fid, "flow": asdict(existing)}
