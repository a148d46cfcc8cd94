"""One request of toggles for one user, and what its answers (or their loss) mean.

`tasks.flow.Flow.pin` toggles, and its boolean answer is the only way to read the state. So a
round sends one toggle per flow that still differs, records every answer by flow id, and never
"pins again to be safe". A lost answer makes the state unknown (None): the next answer tells.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any, Literal

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from b24app import metrics, tokens
from b24app.bitrix.client import BATCH_LIMIT
from b24app.bitrix.errors import (
    AccessDenied,
    BadRequest,
    BitrixError,
    MalformedAnswer,
    MethodNotFound,
    OperationTimeLimit,
    PortalGone,
    RateLimited,
    ReinstallRequired,
    ReopenRequired,
    ResponseLost,
    TransientError,
)
from b24app.models import Portal, PortalUser
from b24app.problems import Problem
from b24app.rawsql import db_datetime
from b24app.redisconn import redis_client
from flows import intents, remote
from flows.lock import LockLost, UserLock
from flows.models import PinIntent
from flows.outcome import Outcome
from flows.pending import PendingIntent

log = logging.getLogger(__name__)

# A round waits this long at most for the portal's bucket (one slot at the default 2/s); longer,
# and the run steps aside (retry) so its worker serves other portals meanwhile.
LIMITER_WAIT = 0.6
# A round of at most this many toggles is interactive (a click or two) and may use the slots of
# the portal's bucket that bulk rounds ("Pin all") leave free.
INTERACTIVE_TOGGLES = 3

Answered = Literal["answered", "lost"]


class BatchSize:
    """How many toggles the next request of one user carries: adaptive, like TCP's window.

    A request whose answer is lost tells nothing about any of its commands, and on a lossy path
    the bigger the request the likelier its answer is lost. So: start small and double while
    answers come (slow start), halve after a lost answer (down to single commands), and grow by
    a few per answered request (additive increase) back towards BATCH_LIMIT. Kept per user in
    Redis for a while, so the next run starts where the last one learnt the path to be.
    """

    START = 10
    STEP = 1
    TTL = 600

    def __init__(self, portal_id: int, user_id: int) -> None:
        self.key = f"fp:batch:{portal_id}:{user_id}"
        raw = redis_client().hgetall(self.key)
        self.size = int(raw.get(b"size", self.START))
        self.slow_start = raw.get(b"slow", b"1") == b"1"
        self.lost_in_a_row = int(raw.get(b"lost", 0))
        self._dirty = False

    def answered(self, sent: int) -> None:
        grown = self.size * 2 if self.slow_start else self.size + self.STEP
        # Only a full request says the path carries that many: a short one grows nothing.
        self._set(min(BATCH_LIMIT, grown) if sent >= self.size else self.size, 0)

    def lost(self, sent: int) -> None:
        self.slow_start = False
        self._set(max(1, min(self.size, sent) // 2), self.lost_in_a_row + 1, changed=True)

    def _set(self, size: int, lost_in_a_row: int, *, changed: bool = False) -> None:
        # Written back only when something changed: a single click on a steady path (the hot
        # path) costs no Redis write.
        self._dirty |= changed or (size, lost_in_a_row) != (self.size, self.lost_in_a_row)
        self.size, self.lost_in_a_row = size, lost_in_a_row

    def save(self) -> None:
        if self._dirty:
            slow = "1" if self.slow_start else "0"
            mapping = {"size": self.size, "slow": slow, "lost": self.lost_in_a_row}
            redis_client().hset(self.key, mapping=mapping)  # type: ignore[arg-type]
            redis_client().expire(self.key, self.TTL)
            self._dirty = False


# --- writing what the portal said -------------------------------------------------------------


def record_answers(
    answers: dict[int, bool | None],
    pending: dict[int, PendingIntent],
    *,
    only_pending: bool = False,
    count: bool = False,
    not_before: datetime | None = None,
) -> None:
    """Write what the portal said. Only observation fields: a click in between keeps its intent.

    An answer counts toward MAX_TOGGLES. A lost one (None) starts the count afresh: the state
    is unknown again, and the answers before it say nothing about whether it will settle — on a
    lossy path each lost answer costs up to two more toggles, which must not add up to "could
    not confirm". An unreadable answer (`count`) does count. One UPDATE per distinct answer.
    """
    now = timezone.now()
    by_answer: dict[bool | None, list[int]] = {}
    for fid, observed in answers.items():
        by_answer.setdefault(observed, []).append(pending[fid].pk)
    with transaction.atomic(), connection.cursor() as cursor:
        for observed, pks in by_answer.items():
            counted = observed is not None or count
            sql = _record_sql(len(pks), counted=counted, only_pending=only_pending)
            status = [PinIntent.Status.PENDING.value] if only_pending else []
            times = [db_datetime(now), db_datetime(not_before), db_datetime(now)]
            cursor.execute(sql, [observed, times[0], times[1], times[2], *pks, *status])


def _record_sql(rows: int, *, counted: bool, only_pending: bool) -> str:
    """The UPDATE of `record_answers`, written here: it runs after every REST request, and the
    ORM building it each time (`filter(pk__in=…).update(…)`) was a noticeable part of a worker's
    CPU per request. Only our own table name and placeholders go into the text."""
    table = connection.ops.quote_name(PinIntent._meta.db_table)
    toggles = "toggles + 1" if counted else "0"
    ids = ", ".join(["%s"] * rows)
    pending = " AND status = %s" if only_pending else ""
    return (
        f"UPDATE {table} SET observed = %s, observed_at = %s, toggles = {toggles},"  # noqa: S608
        f" not_before = %s, updated_at = %s WHERE id IN ({ids}){pending}"
    )


def finish(intent_ids: list[int], status: str, problem: str, **still: Any) -> None:
    """Close pending intents. `still` re-checks, in the same UPDATE, what the verdict rests on:
    a click that landed after the intents were read must not be closed with a stale verdict."""
    if intent_ids:
        intents.settle(PinIntent.objects.filter(pk__in=intent_ids), status, problem, **still)


def _mark_problem(intent_ids: list[int], problem: str) -> None:
    PinIntent.objects.filter(pk__in=intent_ids, status=PinIntent.Status.PENDING).update(
        problem=problem, updated_at=timezone.now()
    )


def limit_wait(exc: BitrixError, *, progress: bool) -> Outcome | None:
    """When a request refused by a limit may go again (no outage: exactly then), or None when
    `exc` is no limit. The portal's bucket (or ours) names its wait; a paused method, its end."""
    if isinstance(exc, RateLimited):
        return Outcome.retry(exc.retry_after, "rate limited", exact=True, progress=progress)
    if isinstance(exc, OperationTimeLimit):
        wait = max(1.0, exc.reset_at - time.time())
        return Outcome.retry(wait, "operating time limit", exact=True, progress=progress)
    return None


def quiet_period(exc: ResponseLost) -> float:
    """How long to leave a flow alone after a toggle whose answer was lost.

    A closed connection means the portal is done with the request. A read timeout does not: the
    portal may still be running it, and a toggle sent now could be answered before that one
    lands — the one interleaving that leaves a wrong state. So wait until the portal must have
    finished it (its own per-request limit), then ask.
    """
    if exc.code == "READ_TIMEOUT":
        return max(1.0, settings.B24_PORTAL_REQUEST_SECONDS - settings.B24_HTTP_TIMEOUT[1] + 1.0)
    return 1.0


# --- one round ----------------------------------------------------------------------------------


def _send(user: PortalUser, ids: list[int]) -> dict[int, bool | BitrixError]:
    """Toggle `ids` in one request; each flow's own failure is its answer."""

    def toggle(client: Any, token: str) -> dict[int, bool | BitrixError]:
        if len(ids) > 1:
            return remote.pin_toggle_many(client, token, ids)
        try:
            return {ids[0]: remote.pin_toggle(client, token, ids[0])}
        except (AccessDenied, BadRequest, MethodNotFound, MalformedAnswer) as exc:
            return {ids[0]: exc}  # this flow's own answer

    bulk = len(ids) > INTERACTIVE_TOGGLES  # leaves a few slots of the bucket to single clicks
    answers: dict[int, bool | BitrixError] = tokens.call_with_user(
        user, toggle, max_wait=LIMITER_WAIT, bulk=bulk
    )
    return answers


def toggle_round(
    portal: Portal,
    user: PortalUser,
    chunk: dict[int, PendingIntent],
    stats: dict[str, int],
    lock: UserLock,
) -> Outcome | Answered:
    """One request for `chunk`: "answered" when the portal answered, whatever it said; "lost"
    when its answer was lost (the flows wait out a quiet period, their state unknown); an
    Outcome when the run must stop. Raises LockLost when the run may no longer speak for them."""
    ids = list(chunk)
    progress = stats["toggles"] > 0
    try:
        answers = _send(user, ids)
        lock.check()  # the lock held through the call: these answers are the latest
    except LockLost:
        # Another run may own these flows now: claim nothing, leave their state unknown.
        record_answers({fid: None for fid in ids}, chunk, only_pending=True)
        raise
    except BitrixError as exc:
        return _request_failed(portal, user, chunk, stats, exc, progress=progress)
    return _read_answers(chunk, answers, stats, progress=progress)


def _stop_all(portal: Portal, user: PortalUser, problem: str) -> int:
    pks = intents.pending_pks(portal.pk, user.user_id)
    finish(pks, PinIntent.Status.FAILED, problem)
    return len(pks)


def _request_failed(
    portal: Portal,
    user: PortalUser,
    chunk: dict[int, PendingIntent],
    stats: dict[str, int],
    exc: BitrixError,
    *,
    progress: bool,
) -> Outcome | Answered:
    """What a whole request's failure means for the run and for the flows in it."""
    pks = [i.pk for i in chunk.values()]
    if isinstance(exc, ReopenRequired):
        _stop_all(portal, user, exc.problem)
        stats["failed"] += len(pks)
        return Outcome.final(exc.problem)
    if isinstance(exc, ReinstallRequired | PortalGone):
        if isinstance(exc, PortalGone):
            tokens.mark_portal_needs_reinstall(portal.pk, "the portal refused the app")
        _stop_all(portal, user, Problem.REINSTALL)
        return Outcome.final(Problem.REINSTALL)
    if (limited := limit_wait(exc, progress=progress)) is not None:
        _mark_problem(pks, Problem.RATE_LIMITED)
        return limited
    if isinstance(exc, ResponseLost):
        # The toggles may or may not have happened: the state is unknown until the next answer,
        # and these flows wait until the portal must be done with them; the others go on.
        quiet_until = timezone.now() + timedelta(seconds=quiet_period(exc))
        record_answers({fid: None for fid in chunk}, chunk, not_before=quiet_until)
        _mark_problem(pks, Problem.UNAVAILABLE)
        metrics.pin_toggles("lost", len(chunk))
        return "lost"
    if isinstance(exc, TransientError):
        _mark_problem(pks, Problem.UNAVAILABLE)
        return Outcome.retry(2.0, "portal unavailable", progress=progress)
    # Permanent, for the whole request.
    log.warning("pin request failed permanently: %s", exc.code)
    finish(pks, PinIntent.Status.FAILED, Problem.GAVE_UP)
    stats["failed"] += len(pks)
    return "answered"


def _read_answers(
    chunk: dict[int, PendingIntent],
    answers: dict[int, bool | BitrixError],
    stats: dict[str, int],
    *,
    progress: bool,
) -> Outcome | Answered:
    """Record each flow's answer: its new state, unknown, or its own failure."""
    observed: dict[int, bool | None] = {}
    unreadable: dict[int, bool | None] = {}
    denied: list[int] = []
    transient_failure = False
    for fid, answer in answers.items():
        if isinstance(answer, bool):
            observed[fid] = answer
            stats["toggles"] += 1
        elif isinstance(answer, MalformedAnswer):
            # Toggled, but the answer says nothing: unknown, and it counts toward MAX_TOGGLES,
            # so a portal that never answers readably ends in "could not confirm", not a loop.
            unreadable[fid] = None
        elif isinstance(answer, TransientError):
            transient_failure = True  # not executed (or unknown): try again next round
        else:
            denied.append(chunk[fid].pk)
            if not isinstance(answer, AccessDenied):
                log.warning("pin of flow %s failed permanently: %s", fid, answer.code)
    if observed:
        record_answers(observed, chunk)
        pinned = sum(1 for state in observed.values() if state)
        metrics.pin_toggles("pinned", pinned)
        metrics.pin_toggles("unpinned", len(observed) - pinned)
    metrics.pin_toggles("unreadable", len(unreadable))
    if unreadable:
        record_answers(unreadable, chunk, count=True)
    if denied:
        finish(denied, PinIntent.Status.FAILED, Problem.DENIED)
        stats["failed"] += len(denied)
    if transient_failure and not observed and not unreadable:
        return Outcome.retry(2.0, "sub-commands failed", progress=progress)
    return "answered"
