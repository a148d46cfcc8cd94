"""Typed wrappers for the flow methods, over the one REST client.

Method names are sent exactly in this case: the `tasks.flow.Flow.*` names exist only in camel case
(a lower-cased name can answer ERROR_METHOD_NOT_FOUND). Docs: the Bitrix24 REST reference,
api-reference/tasks/flow/ (pin, get) and the platform brief §7.3 (the undocumented list).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from b24app.bitrix.client import BATCH_LIMIT, PortalClient
from b24app.bitrix.errors import BadRequest, BitrixError, MalformedAnswer

FLOW_LIST = "tasks.flow.Flow.list"  # undocumented; absent on older on-premise portals
FLOW_GET = "tasks.flow.Flow.get"
FLOW_PIN = "tasks.flow.Flow.pin"  # a per-user TOGGLE; answers the new state
TASK_LIST = "tasks.task.list"


@dataclass(frozen=True)
class FlowRow:
    """One flow as the app shows it: read from the portal, kept in the snapshot, sent to the
    page (`as_json`: the page's keys) and added by id."""

    flow_id: int
    name: str
    active: bool
    efficiency: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.flow_id,
            "name": self.name,
            "active": self.active,
            "efficiency": self.efficiency,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FlowRow:
        """The inverse of `as_json` (a snapshot read back from Redis)."""
        eff = data.get("efficiency")
        return cls(int(data["id"]), str(data["name"]), bool(data["active"]), eff)

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> FlowRow:
        eff = raw.get("efficiency")
        return cls(
            flow_id=int(raw.get("id") or raw.get("ID") or 0),
            name=str(raw.get("name") or raw.get("NAME") or ""),
            active=_truthy(raw.get("active", raw.get("ACTIVE", True))),
            efficiency=int(eff)
            if isinstance(eff, int | float | str) and str(eff).lstrip("-").isdigit()
            else None,
        )


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.upper() in {"Y", "1", "TRUE"}
    return bool(value)


def flow_list(client: PortalClient, token: str) -> list[FlowRow]:
    """Every flow the token's user can see: pages of 50 via `start` (no total/next)."""
    params = {"select": ["ID", "NAME", "ACTIVE", "EFFICIENCY"], "order": {"ID": "ASC"}}
    flows = [
        FlowRow.from_api(item)
        for item in client.paginate(FLOW_LIST, params, token=token)
        if isinstance(item, Mapping)
    ]
    return [f for f in flows if f.flow_id > 0]


def flow_ids_from_tasks(client: PortalClient, token: str, *, max_pages: int = 40) -> set[int]:
    """Fallback discovery: the distinct FLOW_IDs of the tasks the user can see."""
    params = {"select": ["ID", "FLOW_ID"], "filter": {">FLOW_ID": 0}, "order": {"ID": "desc"}}
    ids: set[int] = set()
    for task in client.paginate(
        TASK_LIST, params, token=token, items_key="tasks", max_pages=max_pages
    ):
        if isinstance(task, Mapping):
            raw = task.get("flowId") or task.get("FLOW_ID")
            if raw is not None and str(raw).isdigit() and int(raw) > 0:
                ids.add(int(raw))
    return ids


def flow_get_many(
    client: PortalClient, token: str, flow_ids: Iterable[int]
) -> tuple[dict[int, FlowRow], dict[int, BitrixError]]:
    """Read flows by id, 50 per batch call. Returns (found, errors by flow id)."""
    found: dict[int, FlowRow] = {}
    failed: dict[int, BitrixError] = {}
    ids = sorted(set(flow_ids))
    for start in range(0, len(ids), BATCH_LIMIT):
        chunk = ids[start : start + BATCH_LIMIT]
        result = client.batch({f"f{i}": (FLOW_GET, {"flowId": i}) for i in chunk}, token=token)
        for fid in chunk:
            key = f"f{fid}"
            if key in result.errors:
                failed[fid] = result.errors[key]
            elif isinstance(result.results.get(key), Mapping):
                info = FlowRow.from_api(result.results[key])
                found[fid] = (
                    info if info.flow_id else FlowRow(fid, info.name, info.active, info.efficiency)
                )
            else:
                failed[fid] = BadRequest("NO_ANSWER", "the batch gave no answer for this flow")
    return found, failed


def pin_toggle(client: PortalClient, token: str, flow_id: int) -> bool:
    """Toggle one flow's pin for the token's user; the answer is the NEW state."""
    return as_bool(client.call(FLOW_PIN, {"flowId": flow_id}, token=token).result)


def pin_toggle_many(
    client: PortalClient, token: str, flow_ids: list[int]
) -> dict[int, bool | BitrixError]:
    """Toggle up to 50 flows in one batch (one request for the rate limit).

    Every answer is read by its command key, never by position. A flow missing from both the
    results and the errors is reported as MalformedAnswer: its state is unknown.
    """
    if len(flow_ids) > BATCH_LIMIT:
        raise ValueError("at most 50 pins in one batch")
    result = client.batch(
        {f"f{fid}": (FLOW_PIN, {"flowId": fid}) for fid in flow_ids}, token=token, halt=False
    )
    answers: dict[int, bool | BitrixError] = {}
    for fid in flow_ids:
        key = f"f{fid}"
        if key in result.errors:
            answers[fid] = result.errors[key]
        elif key in result.results:
            try:
                answers[fid] = as_bool(result.results[key])
            except MalformedAnswer as exc:
                answers[fid] = exc
        else:
            # It may have run: its state is unknown, as with any unreadable answer.
            answers[fid] = MalformedAnswer("NO_ANSWER", "the batch gave no answer for this flow")
    return answers


_TRUE = {"true", "1", "y"}
_FALSE = {"false", "0", "n", ""}


def as_bool(value: Any) -> bool:
    """The pin state an answer carries. Anything else is not read as "unpinned": the toggle
    happened, and its result is unknown (MalformedAnswer)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise MalformedAnswer("MALFORMED_ANSWER", "the pin answer is not a state")
