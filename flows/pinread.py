"""Read a user's real pin states from Bitrix24 with toggle pairs.

Bitrix24 has no way to read whether a user pinned a flow: `tasks.flow.Flow.pin` only toggles
and answers the new state. Two pin commands for the same flow, back to back in one `batch`
(which runs its commands in order), flip the state and flip it back: the second answer is the
state the user had, and the pin is as it was when the request ends. 25 flows per request.

The batch is sent with halt: after a failed command nothing more runs, so a pair is broken only
where its second command failed. That flow was left flipped: its desired state is recorded as
the one the user had (the opposite of the first answer) and convergence puts it back. A click
that lands while a read runs wins: a pending intent keeps its desired state, and flows with a
pending intent are not read at all. Reads run inside the user's convergence run (`converge`),
so under the same lock and rate limiter as every other pin call.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from b24app import tokens
from b24app.bitrix.client import BATCH_LIMIT, PortalClient
from b24app.bitrix.errors import (
    BitrixError,
    MalformedAnswer,
    OperationTimeLimit,
    RateLimited,
    TransientError,
)
from b24app.models import Portal, PortalUser
from b24app.problems import Problem
from b24app.redisconn import redis_client
from flows import remote, snapshots
from flows.lock import UserLock
from flows.models import PinIntent, PinRead
from flows.outcome import Kind, Outcome

log = logging.getLogger(__name__)

PAIRS_PER_REQUEST = BATCH_LIMIT // 2  # 25 flows, 50 commands
READING_TTL = 600  # seconds the "reading" marker outlives a read that died


def _reading_key(portal_id: int, user_id: int) -> str:
    return f"fp:reading:{portal_id}:{user_id}"


def request(portal_id: int, user_id: int, *, first_only: bool = False) -> bool:
    """Ask for a read of the user's pins (every flow observed before now). `first_only`: only
    if this user's pins were never read or asked for (the first open). True when asked."""
    if not settings.FLOWPINS_READ_PINS:
        return False
    now = timezone.now()
    if first_only:
        _, created = PinRead.objects.get_or_create(
            portal_id=portal_id, user_id=user_id, defaults={"requested_at": now}
        )
        if not created:
            return False
    else:
        PinRead.objects.update_or_create(
            portal_id=portal_id, user_id=user_id, defaults={"requested_at": now}
        )
    redis_client().set(_reading_key(portal_id, user_id), "1", ex=READING_TTL)
    return True


def wanted_users() -> list[tuple[int, int]]:
    """Every (portal, user) with a read asked for and not finished (a sweep resumes them)."""
    return list(
        PinRead.objects.filter(requested_at__isnull=False).values_list("portal_id", "user_id")
    )


def ready(portal_id: int, user_id: int) -> bool:
    """A read is wanted and the user's list is there to read it by."""
    return in_flight(portal_id, user_id) and snapshots.status(portal_id, user_id).exists


def in_flight(portal_id: int, user_id: int) -> bool:
    """A read is asked for or running (the page keeps asking for rows meanwhile)."""
    return bool(redis_client().exists(_reading_key(portal_id, user_id)))


def _wanted(portal: Portal, user_id: int, since: datetime) -> list[int]:
    """The flows of the user's list to read: no pending click (it wins, and its answers tell
    the state), and not observed since the read was asked for."""
    snap = snapshots.get(portal, user_id)
    if snap is None:
        return []
    ids = [row.flow_id for row in snap.flows]
    skip = set(
        PinIntent.objects.filter(portal=portal, user_id=user_id, flow_id__in=ids)
        .filter(Q(status=PinIntent.Status.PENDING) | Q(observed_at__gte=since))
        .values_list("flow_id", flat=True)
    )
    return [fid for fid in ids if fid not in skip]


def _finished(portal: Portal, user_id: int) -> None:
    PinRead.objects.filter(portal=portal, user_id=user_id).update(
        requested_at=None, read_at=timezone.now()
    )
    redis_client().delete(_reading_key(portal.pk, user_id))
    # A new version: the open page fetches its rows again and shows what was read.
    snapshots.update(portal, user_id, lambda current: current)


def _given_up(portal: Portal, user_id: int) -> None:
    """A read that cannot go on is no longer asked for; its flows stay "not read yet" until the
    user asks again (Check pins in Bitrix24)."""
    PinRead.objects.filter(portal=portal, user_id=user_id).update(requested_at=None)
    redis_client().delete(_reading_key(portal.pk, user_id))


def read_rounds(
    portal: Portal, user: PortalUser, stats: dict[str, int], lock: UserLock, rounds: int = 8
) -> Outcome | None:
    """Read what is wanted, a request of 25 flows at a time (at most `rounds`). None when the
    read is done (or none was asked for); else when to come back for the rest (FINAL: never)."""
    asked = PinRead.objects.filter(portal=portal, user_id=user.user_id).first()
    if asked is None or asked.requested_at is None:
        return None
    if not snapshots.status(portal, user.user_id).exists:
        return None  # the list is not there yet: its refresh starts the run again when it lands
    # Asked on another machine, whose clock may be ahead of this one's: what this run records
    # must count as read after the ask, or the same flows would be read again and again.
    since = min(asked.requested_at, timezone.now())
    for _ in range(rounds):
        lock.check()
        wanted = _wanted(portal, user.user_id, since)
        if not wanted:
            _finished(portal, user.user_id)
            return None
        stopped = _read_once(user, wanted[:PAIRS_PER_REQUEST], stats)
        if stopped is not None and stopped.kind is Kind.FINAL:
            _given_up(portal, user.user_id)  # the user must reopen, or an admin reinstall
        if stopped is not None:
            return stopped
    return Outcome.retry(0.0, "more pins to read than one run reads", exact=True, progress=True)


@dataclass(frozen=True)
class PairAnswer:
    """What one flow's pair said: `state` the user had (None: unknown), `flipped`: the pair
    broke after its first toggle, so the pin is the opposite of `state` now."""

    flow_id: int
    state: bool | None
    flipped: bool = False
    unreadable: bool = False  # the first command was refused for good: nothing ran for it


def _read_once(user: PortalUser, flow_ids: list[int], stats: dict[str, int]) -> Outcome | None:
    """One request of pairs. Its answers are recorded even if the run's lock lapsed meanwhile:
    a broken pair left a flow flipped, and only this answer says so."""
    progress = stats["toggles"] > 0 or stats.get("reads", 0) > 0
    try:
        result = tokens.call_with_user(
            user, lambda client, token: _pairs(client, token, flow_ids), max_wait=0.6, bulk=True
        )
    except BitrixError as exc:
        return _request_failed(exc, progress=progress)
    answers = [_pair_answer(fid, result.results, result.errors) for fid in flow_ids]
    record(user.portal_id, user.user_id, answers)
    stats["reads"] = stats.get("reads", 0) + 1
    if any(a.state is None and not a.unreadable for a in answers):
        # A command failed and halted the rest: the next round reads them again.
        failed = next(iter(result.errors.values()), None)
        if isinstance(failed, TransientError):
            return Outcome.retry(2.0, "a read command failed", progress=True)
    return None


def _pairs(client: PortalClient, token: str, flow_ids: list[int]) -> Any:
    commands: dict[str, tuple[str, dict[str, Any]]] = {}
    for fid in flow_ids:
        commands[f"a{fid}"] = (remote.FLOW_PIN, {"flowId": fid})
        commands[f"b{fid}"] = (remote.FLOW_PIN, {"flowId": fid})
    return client.batch(commands, token=token, halt=True)


def _pair_answer(
    flow_id: int, results: dict[str, Any], errors: dict[str, BitrixError]
) -> PairAnswer:
    first, second = f"a{flow_id}", f"b{flow_id}"
    if first in errors:
        # Refused before it ran (no access, say): nothing changed; unknown, not read again
        # unless the refusal was transient.
        return PairAnswer(flow_id, None, unreadable=not errors[first].transient)
    if first not in results:
        return PairAnswer(flow_id, None)  # halted before this pair: untouched
    try:
        after_first = remote.as_bool(results[first])
    except MalformedAnswer:
        return PairAnswer(flow_id, None, flipped=second not in results)
    if second in results:
        try:
            return PairAnswer(flow_id, remote.as_bool(results[second]))
        except MalformedAnswer:
            return PairAnswer(flow_id, not after_first)
    # The second toggle did not run (it failed, or halt stopped it): left flipped.
    return PairAnswer(flow_id, not after_first, flipped=True)


def _request_failed(exc: BitrixError, *, progress: bool) -> Outcome:
    """A read request that failed as a whole ran none of its commands (or, its answer lost,
    all of them: a batch runs to its end): nothing is recorded and the flows are read again."""
    if isinstance(exc, RateLimited):
        return Outcome.retry(exc.retry_after, "rate limited", exact=True, progress=progress)
    if isinstance(exc, OperationTimeLimit):
        wait = max(1.0, exc.reset_at - time.time())
        return Outcome.retry(wait, "operating time limit", exact=True, progress=progress)
    if isinstance(exc, TransientError):
        return Outcome.retry(2.0, "reading pins: portal unavailable", progress=progress)
    log.info("reading pins failed permanently: %s", exc.code)
    return Outcome.final(exc.problem)


@functools.cache
def _record_sql(vendor: str, count: int) -> str:
    qn = connection.ops.quote_name
    table = qn(PinIntent._meta.db_table)
    rows = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s)"] * count)
    pending = PinIntent.Status.PENDING
    # A pending click keeps its desired state and stays pending; everything else takes what the
    # read says. Only our own names and placeholders go into the text.
    return f"""
        INSERT INTO {table} (portal_id, user_id, flow_id, desired, observed, observed_at,
                             status, toggles, problem, created_at, updated_at)
        VALUES {rows}
        ON CONFLICT (portal_id, user_id, flow_id) DO UPDATE SET
            observed = excluded.observed, observed_at = excluded.observed_at,
            desired = CASE WHEN {table}.status = '{pending}' THEN {table}.desired
                           ELSE excluded.desired END,
            toggles = CASE WHEN {table}.status = '{pending}' THEN {table}.toggles ELSE 0 END,
            problem = CASE WHEN {table}.status = '{pending}' THEN {table}.problem
                           ELSE excluded.problem END,
            status = CASE WHEN {table}.status = '{pending}' THEN {table}.status
                          ELSE excluded.status END,
            updated_at = excluded.updated_at
    """  # noqa: S608


def record(portal_id: int, user_id: int, answers: list[PairAnswer]) -> None:
    """Write what a read learnt, one statement: a known state (done), a broken pair (pending:
    the user's state is desired, the flipped one observed), a flow the user may not pin
    (failed, denied)."""
    now = timezone.now()
    params: list[Any] = []
    count = 0
    for a in answers:
        if a.state is None and not a.unreadable and not a.flipped:
            continue  # untouched: read again
        problem = ""
        if a.state is None:
            desired, observed, status = False, None, PinIntent.Status.FAILED
            problem = Problem.DENIED
        elif a.flipped:
            desired, observed, status = a.state, not a.state, PinIntent.Status.PENDING
        else:
            desired, observed, status = a.state, a.state, PinIntent.Status.DONE
        params += [portal_id, user_id, a.flow_id, desired, observed, now, status, problem, now, now]
        count += 1
    if count:
        with connection.cursor() as cursor:
            cursor.execute(_record_sql(connection.vendor, count), params)
