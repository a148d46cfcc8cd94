"""Toggle pairs: the batch that reads a flow's pin state, what each pair's answers say, and
how that is written (`flows.pinread` sends them and decides what comes next)."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection
from django.utils import timezone

from b24app.bitrix.client import PortalClient
from b24app.bitrix.errors import AccessDenied, BitrixError, MalformedAnswer
from b24app.problems import Problem
from flows import remote
from flows.models import PinIntent


class Seen(enum.Enum):
    """What one flow's pair told."""

    KNOWN = "known"  # both toggles answered: `state` is the user's, the pin is as it was
    FLIPPED = "flipped"  # the second toggle did not run: the pin is the opposite of `state`
    ONCE = "once"  # toggled once, its answer unreadable: one more toggle answers the state
    UNKNOWN = "unknown"  # both toggles ran, their answers say nothing: as it was, unknown
    DENIED = "denied"  # refused before anything ran (the user may not pin this flow)
    UNTOUCHED = "untouched"  # nothing ran (halted before it, or a passing failure): read again


@dataclass(frozen=True)
class PairAnswer:
    flow_id: int
    seen: Seen
    state: bool | None = None  # KNOWN, FLIPPED: the state the user had


def batch_of_pairs(client: PortalClient, token: str, flow_ids: list[int]) -> Any:
    commands: dict[str, tuple[str, dict[str, Any]]] = {}
    for fid in flow_ids:
        commands[f"a{fid}"] = (remote.FLOW_PIN, {"flowId": fid})
        commands[f"b{fid}"] = (remote.FLOW_PIN, {"flowId": fid})
    return client.batch(commands, token=token, halt=True)


def _readable(value: Any) -> bool | None:
    try:
        return remote.as_bool(value)
    except MalformedAnswer:
        return None


def pair_answer(
    flow_id: int, results: dict[str, Any], errors: dict[str, BitrixError]
) -> PairAnswer:
    first, second = f"a{flow_id}", f"b{flow_id}"
    if first in errors:  # refused before it ran: nothing changed
        refused = isinstance(errors[first], AccessDenied)
        return PairAnswer(flow_id, Seen.DENIED if refused else Seen.UNTOUCHED)
    if first not in results:
        return PairAnswer(flow_id, Seen.UNTOUCHED)  # halt stopped the batch before this pair
    after_first = _readable(results[first])
    if second not in results:  # the second toggle failed, or halt stopped it: toggled once
        if after_first is None:
            return PairAnswer(flow_id, Seen.ONCE)
        return PairAnswer(flow_id, Seen.FLIPPED, not after_first)
    after_second = _readable(results[second])
    if after_second is not None and after_first is not None and after_second == after_first:
        return PairAnswer(flow_id, Seen.UNKNOWN)  # two toggles, one state: someone else toggled
    if after_second is not None:
        return PairAnswer(flow_id, Seen.KNOWN, after_second)
    if after_first is not None:
        return PairAnswer(flow_id, Seen.KNOWN, not after_first)
    return PairAnswer(flow_id, Seen.UNKNOWN)


@functools.cache
def _record_sql(vendor: str, count: int, *, learnt: bool) -> str:
    """`learnt`: a state (or a broken pair) — a pending click keeps its desired state and stays
    pending, anything else takes what the read says. Else only the time of the read is noted
    on an existing row (a new one says "unknown" or "denied"). Our own names and placeholders
    only go into the text."""
    qn = connection.ops.quote_name
    table = qn(PinIntent._meta.db_table)
    rows = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s)"] * count)
    insert = f"""
        INSERT INTO {table} (portal_id, user_id, flow_id, desired, observed, observed_at,
                             status, toggles, problem, created_at, updated_at)
        VALUES {rows}
        ON CONFLICT (portal_id, user_id, flow_id) DO UPDATE SET
    """  # noqa: S608
    if not learnt:
        return insert + "observed_at = excluded.observed_at"
    pending = PinIntent.Status.PENDING

    def keep(column: str, otherwise: str) -> str:
        kept = f"{table}.{column}"
        return f"{column} = CASE WHEN {table}.status = '{pending}' THEN {kept} ELSE {otherwise} END"

    return insert + ", ".join(
        [
            "observed = excluded.observed",
            "observed_at = excluded.observed_at",
            keep("desired", "excluded.desired"),
            keep("toggles", "0"),
            keep("problem", "excluded.problem"),
            keep("status", "excluded.status"),
            # a settled row a broken pair turns pending waits from now (the oldest-pending
            # gauge, the click-to-settled histogram), not from its click long ago
            keep(
                "created_at",
                f"CASE WHEN excluded.status = '{pending}' THEN excluded.created_at"
                f" ELSE {table}.created_at END",
            ),
            "updated_at = excluded.updated_at",
        ]
    )


def _row(portal_id: int, user_id: int, a: PairAnswer, now: datetime) -> list[Any]:
    """The row a read writes for one flow: portal, user, flow, desired, observed, observed_at,
    status, problem, created_at, updated_at."""
    if a.seen is Seen.KNOWN:
        values: tuple[Any, ...] = (a.state, a.state, PinIntent.Status.DONE, "")
    elif a.seen is Seen.FLIPPED:
        assert a.state is not None
        values = (a.state, not a.state, PinIntent.Status.PENDING, "")
    elif a.seen is Seen.DENIED:
        values = (False, None, PinIntent.Status.FAILED, Problem.DENIED)
    else:  # UNKNOWN
        values = (False, None, PinIntent.Status.DONE, "")
    desired, observed, status, problem = values
    return [portal_id, user_id, a.flow_id, desired, observed, now, status, problem, now, now]


def record(portal_id: int, user_id: int, answers: list[PairAnswer]) -> None:
    """Write what a read learnt, at most two statements: known states (done) and broken pairs
    (pending: the user's state desired, the flipped one observed); flows it could not learn
    (unknown, denied) get the time of the read, so they are not read again in this read."""
    now = timezone.now()
    learnt = [a for a in answers if a.seen in (Seen.KNOWN, Seen.FLIPPED)]
    noted = [a for a in answers if a.seen in (Seen.UNKNOWN, Seen.DENIED)]
    with connection.cursor() as cursor:
        for group, is_learnt in ((learnt, True), (noted, False)):
            if group:
                params = [v for a in group for v in _row(portal_id, user_id, a, now)]
                sql = _record_sql(connection.vendor, len(group), learnt=is_learnt)
                cursor.execute(sql, params)
