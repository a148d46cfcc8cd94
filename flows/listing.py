"""Ask the portal which flows a user sees, and keep the answer: the snapshot for the page and
the flows learnt per portal (so a known flow without a visible task is not lost)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from django.conf import settings

from b24app import tokens
from b24app.bitrix.errors import (
    MethodNotFound,
    ReinstallRequired,
    ReopenRequired,
    TransientError,
)
from b24app.models import Portal, PortalUser
from b24app.problems import Problem
from flows import remote, snapshots
from flows.models import Flow
from flows.remote import FlowRow
from flows.snapshots import Snapshot

log = logging.getLogger(__name__)

# A refresh that finds a snapshot this young has nothing to add.
REFRESH_SKIP_SECONDS = 5


def _remember(portal: Portal, flows: Iterable[FlowRow], source: str) -> None:
    """One upsert statement per call, however many flows (a page render may bring thousands)."""
    rows = [
        Flow(
            portal=portal,
            flow_id=f.flow_id,
            name=f.name[:500],
            active=f.active,
            efficiency=f.efficiency,
            source=source,
        )
        for f in flows
    ]
    if rows:
        Flow.objects.bulk_create(
            rows,
            batch_size=1000,
            update_conflicts=True,
            unique_fields=["portal", "flow_id"],
            update_fields=["name", "active", "efficiency", "updated_at"],
        )


def fetch(portal: Portal, user: PortalUser, *, bulk: bool = False) -> Snapshot:
    """Ask the portal which flows this user sees: one call per 50 flows.

    Flow.list where the portal has it; on older portals, the flow ids of the user's tasks plus
    every flow this portal is known to have, read with Flow.get in batches of 50 (a flow the user
    cannot see answers "access denied" and is left out).
    """

    def read(client: Any, token: str) -> Snapshot:
        try:
            found = remote.flow_list(client, token)
            _remember(portal, found, Flow.Source.LIST)
            return Snapshot(found, time.time(), "list")
        except MethodNotFound:
            pass
        ids = remote.flow_ids_from_tasks(client, token)
        ids |= set(Flow.objects.filter(portal=portal).values_list("flow_id", flat=True))
        got, _ = remote.flow_get_many(client, token, ids)
        _remember(portal, got.values(), Flow.Source.TASK)
        return Snapshot([got[i] for i in sorted(got)], time.time(), "tasks")

    started = time.time()
    snap = tokens.call_with_user(user, read, max_wait=3.0, bulk=bulk)
    snap.fetched_at = started  # the list is as of when it was asked for, not when it arrived
    return snapshots.put(portal, user.user_id, snap, started=started)


def fetch_problem(exc: BaseException) -> Problem:
    """Why a fetch of the list failed, as the page waiting on it shows it."""
    if isinstance(exc, ReopenRequired | ReinstallRequired):
        return exc.problem
    if isinstance(exc, TransientError):
        return Problem.LIST_BUSY
    return Problem.LIST_REFUSED


def refresh(portal_id: int, user_id: int, *, interactive: bool = False, force: bool = False) -> str:
    """Fetch the user's list into the snapshot; on failure the page keeps what it has and learns
    why. Safe to run twice: it only reads the portal and overwrites the snapshot. `force`:
    fetch even when a refresh just landed (an operator's or a benchmark's ask)."""
    try:
        portal = Portal.objects.filter(pk=portal_id, state=Portal.State.ACTIVE).first()
        user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
        if portal is None or user is None:
            return "skipped"
        current = snapshots.get(portal, user_id)
        if current is not None and current.age < REFRESH_SKIP_SECONDS and not force:
            return "skipped: another refresh just landed"
        try:
            snap = fetch(portal, user, bulk=not interactive)
        except Exception as exc:  # a background refresh: the page keeps what it has
            problem = fetch_problem(exc)
            snapshots.remember_problem(portal, user_id, problem)
            log.info("snapshot refresh for portal %s failed: %s", portal.member_id, problem)
            return "failed"
        return f"{len(snap.flows)} flows"
    finally:
        snapshots.release_refresh(portal_id, user_id)


def add_by_id(portal: Portal, user: PortalUser, flow_id: int, *, deadline: bool = False) -> FlowRow:
    """A user adds a flow by its id or link: read it as that user (proves they can see it).

    `deadline`: asked from a web request, so wait for the portal no longer than
    B24_WEB_TIMEOUT (a slower answer is a transient error; the caller hands the job to a worker).
    """

    def get(client: Any, token: str) -> FlowRow:
        found, failed = remote.flow_get_many(client, token, [flow_id])
        if flow_id in failed:
            raise failed[flow_id]
        return found[flow_id]

    row = tokens.call_with_user(
        user,
        get,
        max_wait=1.0 if deadline else 3.0,
        timeout=settings.B24_WEB_TIMEOUT if deadline else None,
    )
    fields = {"name": row.name[:500], "active": row.active, "efficiency": row.efficiency}
    Flow.objects.update_or_create(
        portal=portal,
        flow_id=row.flow_id,
        defaults=fields,
        create_defaults={**fields, "source": Flow.Source.USER},
    )
    snapshots.add_row(portal, user.user_id, row)
    return row
