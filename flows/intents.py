"""Pin intents: what each user wants for each flow, with what the portal last answered.

A click writes the desired state here and nothing else (`set_desired`); the converger
(`flows.converge`) reads it and records the portal's answers. The page's reads are here too.
"""

from __future__ import annotations

import functools
import json
from datetime import timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, QuerySet
from django.utils import timezone

from b24app import metrics, stored
from b24app.models import Portal, PortalUser
from b24app.problems import Problem
from flows.models import Flow, PinIntent, PinRead

# At most this many of one user's intents wait at a time: far above any real portal's flows,
# but a bound on what one user (or a replayed request) can make the workers do.
MAX_PENDING_PER_USER = 5000


class NotRecorded(Exception):
    """A click recorded nothing: some flow is not known on the portal, the portal is not active
    or the user never opened the app. The caller finds out which (the rare, slow path)."""


def _portal_id(portal: Portal | int) -> int:
    return portal if isinstance(portal, int) else portal.pk


@functools.lru_cache(maxsize=512)  # built once per number of flows (a click: 1)
def _upsert_sql(count: int) -> str:
    qn = connection.ops.quote_name
    intent, flow = qn(PinIntent._meta.db_table), qn(Flow._meta.db_table)
    portal, user = qn(Portal._meta.db_table), qn(PortalUser._meta.db_table)
    ids = ", ".join(["(%s)"] * count)
    # created_at is the click's time: a click makes a new intent (metrics: click → settled).
    # Unless told to record anything (the first parameter): every row or none, and only when
    # each flow named is known on the portal and the portal is active with this user in it.
    # Only our own table names and placeholders go into the text; every value is a parameter.
    return f"""
        WITH ids (flow_id) AS (VALUES {ids})
        INSERT INTO {intent} (portal_id, user_id, flow_id, desired, observed, observed_at,
                              status, problem, toggles, created_at, updated_at)
        SELECT %s, %s, ids.flow_id, %s, NULL, NULL, %s, '', 0, %s, %s
        FROM ids
        WHERE %s OR (
            (SELECT COUNT(*) FROM {flow} k
             WHERE k.portal_id = %s AND k.flow_id IN (SELECT flow_id FROM ids)) = %s
            AND EXISTS (SELECT 1 FROM {user} u JOIN {portal} p ON p.id = u.portal_id
                        WHERE u.portal_id = %s AND u.user_id = %s AND p.state = %s)
        )
        ON CONFLICT (portal_id, user_id, flow_id) DO UPDATE SET
            desired = excluded.desired, toggles = 0, problem = '',
            status = excluded.status, updated_at = excluded.updated_at,
            created_at = excluded.created_at
        RETURNING id, flow_id, desired, observed, status, problem
    """  # noqa: S608


def set_desired(
    portal: Portal | int,
    user_id: int,
    flow_ids: list[int],
    desired: bool,
    *,
    known_only: bool = False,
) -> list[PinIntent]:
    """Record the user's click(s): the latest intent wins. Returns the intents.

    One statement however many flows ("Pin all" may name hundreds), in its own transaction:
    create the missing rows and set the intent on the others. `known_only` (a click): only if
    every flow is known on the portal, the portal is active and the user has opened the app —
    else nothing is written and NotRecorded raised.
    """
    portal_id = _portal_id(portal)
    flow_ids = list(dict.fromkeys(flow_ids))
    now = timezone.now()
    params: list[Any] = [
        *flow_ids,
        portal_id, user_id, desired, PinIntent.Status.PENDING, now, now,
        not known_only, portal_id, len(flow_ids), portal_id, user_id, Portal.State.ACTIVE,
    ]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(_upsert_sql(len(flow_ids)), params)
        rows = cursor.fetchall()
    if len(rows) != len(flow_ids):
        raise NotRecorded()
    # Always pending, even when desired equals the last answer: a toggle of an earlier click
    # may still be on its way to the portal, and only the converger (under the user's lock)
    # knows. It marks the intent done without a call when nothing is.
    return [
        PinIntent(
            pk=pk,
            portal_id=portal_id,
            user_id=user_id,
            flow_id=flow_id,
            desired=bool(want),
            observed=None if seen is None else bool(seen),
            status=status,
            problem=problem,
            toggles=0,
            updated_at=now,
        )
        for pk, flow_id, want, seen, status, problem in rows
    ]


def unknown_flows(portal: Portal | int, flow_ids: list[int]) -> list[int]:
    """The ids among `flow_ids` this portal was never seen to have (by a list or an add)."""
    known = set(
        Flow.objects.filter(portal_id=_portal_id(portal), flow_id__in=flow_ids).values_list(
            "flow_id", flat=True
        )
    )
    return [fid for fid in flow_ids if fid not in known]


def _pending(portal_id: int, user_id: int) -> Any:
    return PinIntent.objects.filter(
        portal_id=portal_id, user_id=user_id, status=PinIntent.Status.PENDING
    )


def pending_room(portal: Portal | int, user_id: int) -> int:
    """How many more of this user's pins may wait (MAX_PENDING_PER_USER at most)."""
    return MAX_PENDING_PER_USER - int(_pending(_portal_id(portal), user_id).count())


def has_pending(portal_id: int, user_id: int) -> bool:
    return bool(_pending(portal_id, user_id).exists())


def pending_pks(portal_id: int, user_id: int) -> list[int]:
    return list(_pending(portal_id, user_id).values_list("pk", flat=True))


def pending_users() -> list[tuple[int, int]]:
    """Every (portal, user) with work left: what a restarted worker picks up again."""
    return list(
        PinIntent.objects.filter(status=PinIntent.Status.PENDING)
        .values_list("portal_id", "user_id")
        .distinct()
    )


def settle(scope: QuerySet[PinIntent], status: str, problem: str, **still: Any) -> int:
    """Close the pending intents of `scope` (that still match `still`) as `status`, counted.
    With metrics on, each one's wait since its click too: read back by the UPDATE's own
    timestamp, so a click that lands after it is not taken for a settled one."""
    now = timezone.now()
    rows = scope.filter(status=PinIntent.Status.PENDING, **still)
    settled = int(rows.update(status=status, problem=problem, updated_at=now))
    waits = None
    if settled and metrics.enabled():
        clicks = scope.filter(status=status, updated_at=now).values_list("created_at", flat=True)
        waits = [(now - clicked).total_seconds() for clicked in clicks]
    metrics.pins_settled(status, problem, waits, settled)
    return settled


def fail_pending(portal_id: int, user_id: int, problem: str) -> int:
    scope = PinIntent.objects.filter(portal_id=portal_id, user_id=user_id)
    return settle(scope, PinIntent.Status.FAILED, problem)


def cancel_portal_work(portal: Portal) -> int:
    scope = PinIntent.objects.filter(portal=portal)
    return settle(scope, PinIntent.Status.FAILED, Problem.REINSTALL)


def pending_facts() -> list[Any]:
    """Scrape-time facts (b24app.metrics): the intents waiting, and the oldest one's wait."""
    found = PinIntent.objects.filter(status=PinIntent.Status.PENDING).aggregate(
        count=Count("pk"), oldest=Min("created_at")
    )
    oldest = found["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest is not None else 0.0
    return [
        metrics.gauge("flowpins_pin_intents_pending", "Pin intents waiting", found["count"]),
        metrics.gauge(
            "flowpins_pin_intents_oldest_pending_seconds",
            "How long the oldest waiting pin intent has waited since its click (0: none waits)",
            age,
        ),
    ]


def prune_settled(*, days: int | None = None) -> int:
    """Delete settled intents older than the retention. A row that knows the pin state (done,
    pinned or not) stays: it is what the page shows, and without it the flow would read as "not
    read yet" again; a failed or unknown one tells nothing a missing row does not."""
    keep = days if days is not None else settings.FLOWPINS_INTENT_DAYS
    cutoff = timezone.now() - timedelta(days=keep)
    deleted, _ = (
        PinIntent.objects.exclude(status=PinIntent.Status.PENDING)
        .filter(updated_at__lt=cutoff)
        .exclude(observed__isnull=False)
        .delete()
    )
    return deleted


# --- what the page reads --------------------------------------------------------------------


class IntentState(NamedTuple):
    """What the page shows of an intent."""

    flow_id: int
    desired: bool
    observed: bool | None
    status: str
    problem: str


_PAGE_COLUMNS = ("flow_id", "desired", "observed", "status", "problem")


def _state(flow_id: Any, desired: Any, seen: Any, status: str, problem: str) -> IntentState:
    return IntentState(
        int(flow_id), bool(desired), None if seen is None else bool(seen), status, problem
    )


@functools.cache
def _by_flow_sql(vendor: str) -> str:
    """Built once: the ORM would build the same text again on every render, at about the cost
    of running it."""
    qn = connection.ops.quote_name
    columns = ", ".join(qn(c) for c in _PAGE_COLUMNS)
    table = qn(PinIntent._meta.db_table)
    return f"SELECT {columns} FROM {table} WHERE {qn('portal_id')} = %s AND {qn('user_id')} = %s"  # noqa: S608  (our names only)


def by_flow(portal: Portal, user: PortalUser) -> dict[int, IntentState]:
    """The user's intents by flow id."""
    with connection.cursor() as cursor:
        cursor.execute(_by_flow_sql(connection.vendor), [portal.pk, user.user_id])
        return {int(row[0]): _state(*row) for row in cursor.fetchall()}


def read_asked(portal: Portal, user: PortalUser) -> bool:
    """Whether a read of this user's real pin states was ever asked for (`flows.pinread`)."""
    return bool(PinRead.objects.filter(portal=portal, user_id=user.user_id).exists())


def page_state_from_json(text: str) -> tuple[bool, dict[int, IntentState]]:
    """What PAGE_STATE read with the portal and the user: whether a read of the user's pins was
    ever asked for, and their intents by flow id."""
    asked, rows = json.loads(text)
    return bool(asked), {int(row[0]): _state(*row) for row in rows}


def _page_state_expression(vendor: str) -> str:
    """One JSON text read with the portal and the user when the app is opened (stored.AlsoRead):
    [read asked for, [[flow_id, desired, observed, status, problem], ...]]."""
    qn = connection.ops.quote_name
    columns = ", ".join(f"i.{qn(c)}" for c in _PAGE_COLUMNS)
    mine = f"i.{qn('portal_id')} = p.{qn('id')} AND i.{qn('user_id')} = u.{qn('user_id')}"
    intents, reads = qn(PinIntent._meta.db_table), qn(PinRead._meta.db_table)
    asked = f"EXISTS (SELECT 1 FROM {reads} i WHERE {mine})"  # noqa: S608  (our names only)
    if vendor == "postgresql":
        found = f"COALESCE(json_agg(json_build_array({columns})), '[]'::json)"
        listed = f"(SELECT {found} FROM {intents} i WHERE {mine})"  # noqa: S608
        return f"json_build_array({asked}, {listed})::text"
    if vendor == "sqlite":
        listed = f"(SELECT json_group_array(json_array({columns})) FROM {intents} i WHERE {mine})"  # noqa: S608
        return f"json_array({asked}, json({listed}))"
    return "NULL"  # read on their own (by_flow, read_asked)


PAGE_STATE = stored.AlsoRead("page_state", _page_state_expression)
