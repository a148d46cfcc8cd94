"""Bring a user's pins in line with their intents: the convergence run.

A run holds the user's lock, reads what is pending, marks what already agrees as done and sends
one request of toggles (`flows.toggles`) for what still differs, round after round. It ends with
an Outcome — done, retry after N seconds, or final — that the Celery task only carries out.
Also here: the "queued" marker (one run per user in flight) and the backoff between runs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

from django.db import DatabaseError
from django.db.models import F
from django.utils import timezone
from redis.exceptions import RedisError

from b24app.bitrix.client import BATCH_LIMIT
from b24app.models import Portal, PortalUser
from b24app.problems import Problem
from b24app.redisconn import redis_client
from flows import intents, pinread
from flows.lock import Busy, LockLost, UserLock
from flows.models import PinIntent
from flows.outcome import Kind, Outcome
from flows.pending import PendingIntent, PendingWindow
from flows.toggles import BatchSize, finish, toggle_round

log = logging.getLogger(__name__)

MAX_TOGGLES = 6  # pin calls for one click before we stop and say so
PENDING_WINDOW = 4 * BATCH_LIMIT  # intents looked at per round
# After this many lost answers in a row the portal, or the way to it, is losing everything (and
# each lost toggle may still have been applied): the run pauses between single toggles, 1, 2, 4
# … at most LOST_PAUSE_MAX seconds, so it neither hammers the portal nor lags once it recovers.
LOST_IN_A_ROW = 12
LOST_PAUSE_MAX = 5.0
QUEUED_TTL = 60
# After this many unexpected failures in a row (a bug, an undecryptable token, an answer we
# cannot read) a user's pending pins are marked failed instead of retried for ever.
MAX_UNEXPECTED_FAILURES = 5
OUTAGES, UNEXPECTED = "failures", "unexpected"  # the two failure counters a user keeps
LOCK_LOST = "lock lost"  # a FINAL outcome's reason: the marker is left to its TTL
BUSY = "busy"  # a RETRY outcome's reason: another run holds the user's lock


# --- one run per user in flight -------------------------------------------------------------


def queued_key(portal_id: int, user_id: int) -> str:
    return f"fp:queued:{portal_id}:{user_id}"


def claim_queued(portal_id: int, user_id: int) -> bool:
    """True when no run of this user is queued or running (and now one is to be)."""
    key = queued_key(portal_id, user_id)
    return bool(redis_client().set(key, "1", nx=True, ex=QUEUED_TTL))


def release_queued(portal_id: int, user_id: int) -> None:
    redis_client().delete(queued_key(portal_id, user_id))


def finish_run(portal_id: int, user_id: int) -> bool:
    """The run is over: drop the marker. True when there is work still — a click that
    committed, or a list that landed for a wanted read, while the run was finishing saw it
    "in flight" and queued nothing."""
    release_queued(portal_id, user_id)
    return intents.has_pending(portal_id, user_id) or pinread.ready(portal_id, user_id)


# --- backoff between runs -------------------------------------------------------------------


def count_failure(portal_id: int, user_id: int, kind: str = OUTAGES) -> int:
    """This user's failed runs in a row, this one included (reset by a run that succeeds).
    Outages and unexpected errors count apart, so a few outages do not use up the
    unexpected-error budget."""
    key = f"fp:{kind}:{portal_id}:{user_id}"
    try:
        failures = int(redis_client().incr(key))
        redis_client().expire(key, 3600)
    except RedisError:
        failures = 4
    return failures


def _clear_failures(portal_id: int, user_id: int, *kinds: str) -> None:
    redis_client().delete(*(f"fp:{kind}:{portal_id}:{user_id}" for kind in kinds))


def backoff(failures: int, at_least: float = 0.0) -> float:
    """Jittered exponential backoff in the number of failures, capped at a minute."""
    wait = max(at_least, min(60.0, 0.5 * 2.0 ** min(failures - 1, 7)))
    return float(wait + random.uniform(0, wait / 2))


def _retry_in(portal_id: int, user_id: int, countdown: float, reason: str) -> Outcome:
    """Retry after `countdown`; the queued marker outlives the wait, so no click queues a
    second run meanwhile."""
    try:
        ttl = QUEUED_TTL + int(countdown) + 1
        redis_client().expire(queued_key(portal_id, user_id), ttl)
    except RedisError:
        pass  # the marker lapses; at worst a click queues a run that finds the lock held
    return Outcome.retry(countdown, reason, exact=True)


# --- the run --------------------------------------------------------------------------------


def run(portal_id: int, user_id: int, *, holder: str = "") -> Outcome:
    """One run for the Celery task: converge, then say what to do next (every delay decided)."""
    queued = queued_key(portal_id, user_id)
    try:
        redis_client().expire(queued, QUEUED_TTL)  # still in flight
        outcome = converge_user(
            portal_id, user_id, holder=holder, keep_alive=((queued, QUEUED_TTL),)
        )
    except (DatabaseError, RedisError) as exc:
        # Our own infrastructure blinked (a failover, a restart): the intents are safe in the
        # database, so back off and try again like any outage.
        log.warning("convergence for a user of portal %s paused: %s", portal_id, type(exc).__name__)
        wait = backoff(count_failure(portal_id, user_id), 1.0)
        return _retry_in(portal_id, user_id, wait, type(exc).__name__)
    except Exception:
        log.exception("convergence for a user of portal %s failed unexpectedly", portal_id)
        return unexpected_failure(portal_id, user_id)
    return _next(portal_id, user_id, outcome)


def _next(portal_id: int, user_id: int, outcome: Outcome) -> Outcome:
    if outcome.kind is Kind.DONE:
        _clear_failures(portal_id, user_id, OUTAGES, UNEXPECTED)
        return replace(outcome, again=finish_run(portal_id, user_id))
    if outcome.kind is Kind.FINAL:
        if outcome.reason == LOCK_LOST:
            # Whoever holds the lock now carries on; if nobody does, the marker's TTL and the
            # sweep start a fresh run.
            log.warning("convergence for a user of portal %s lost its lock", portal_id)
            return outcome
        return replace(outcome, again=finish_run(portal_id, user_id))
    if outcome.progress:  # the portal answered this run: the outage before it is over
        _clear_failures(portal_id, user_id, OUTAGES)
    if outcome.exact:
        # The bucket has room, or a quiet period ends, exactly then: come back then (plus a
        # hair, so the waiting users of one portal do not all arrive at the same instant).
        countdown = max(0.0, outcome.delay) + random.uniform(0, 0.05)
    else:  # an outage, or answers lost again and again
        countdown = backoff(count_failure(portal_id, user_id), outcome.delay)
    return _retry_in(portal_id, user_id, countdown, outcome.reason)


def unexpected_failure(portal_id: int, user_id: int) -> Outcome:
    """Back off like an outage — never re-run at once — and give up after a few in a row."""
    failures = count_failure(portal_id, user_id, UNEXPECTED)
    if failures < MAX_UNEXPECTED_FAILURES:
        return _retry_in(portal_id, user_id, backoff(failures, 1.0), "unexpected failure")
    failed = intents.fail_pending(portal_id, user_id, Problem.INTERNAL)
    _clear_failures(portal_id, user_id, UNEXPECTED)
    reason = f"gave up after {failures} unexpected failures ({failed} pins marked failed)"
    return replace(Outcome.final(reason), again=finish_run(portal_id, user_id))


def converge_user(
    portal_id: int,
    user_id: int,
    *,
    max_rounds: int = 40,
    holder: str = "",
    keep_alive: tuple[tuple[str, int], ...] = (),
    lock_ttl_ms: int | None = None,
) -> Outcome:
    """Bring every pending pin of one user in line with their intents, under the user's lock.

    Each round takes what is pending (at most 50), marks the converged ones done, and toggles the
    others in one request (a batch when there are several). Answers are recorded by flow id;
    whatever still differs goes round again. The Outcome's delays here are the engine's own
    (`run` adds the backoff between runs).
    """
    stats = {"rounds": 0, "toggles": 0, "done": 0, "failed": 0, "reads": 0}
    portal = Portal.objects.filter(pk=portal_id).first()
    user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
    if portal is None or user is None:
        return Outcome.done(stats)
    batch = BatchSize(portal_id, user_id)
    try:
        with UserLock(
            portal_id, user_id, holder, ttl_ms=lock_ttl_ms, keep_alive=keep_alive
        ) as lock:
            try:
                return _read_then_converge(portal, user, stats, lock, batch, max_rounds)
            finally:
                batch.save()
    except Busy:
        # A duplicate run (after a restart or a sweep) holds the lock; come back shortly.
        return Outcome.retry(random.uniform(0.2, 0.6), BUSY, exact=True)
    except LockLost:
        return Outcome.final(LOCK_LOST)


def _read_then_converge(
    portal: Portal,
    user: PortalUser,
    stats: dict[str, int],
    lock: UserLock,
    batch: BatchSize,
    max_rounds: int,
) -> Outcome:
    """A read of the user's real pin states first, when one is asked for (`flows.pinread`);
    then the pending pins — a click, or a flow a broken pair left flipped. A read that must
    come back later does not hold those up."""
    read = pinread.read_rounds(portal, user, stats, lock)
    if read is not None and read.kind is Kind.FINAL:
        return read
    outcome = _rounds(portal, user, stats, lock, batch, max_rounds)
    if outcome.kind is Kind.DONE and read is not None:
        return read  # the pins are settled; come back for the rest of the read
    return outcome


def _settle_agreed(pending: list[PendingIntent], stats: dict[str, int]) -> list[PendingIntent]:
    """Close what agrees with its intent, and what used up its toggles; return the rest."""
    done = [i.pk for i in pending if i.converged]
    finish(done, PinIntent.Status.DONE, "", observed=F("desired"))
    stats["done"] += len(done)
    exhausted = [i.pk for i in pending if not i.converged and i.toggles >= MAX_TOGGLES]
    finish(exhausted, PinIntent.Status.FAILED, Problem.GAVE_UP, toggles__gte=MAX_TOGGLES)
    stats["failed"] += len(exhausted)
    return [i for i in pending if not i.converged and i.toggles < MAX_TOGGLES]


def _rounds(
    portal: Portal,
    user: PortalUser,
    stats: dict[str, int],
    lock: UserLock,
    batch: BatchSize,
    max_rounds: int,
) -> Outcome:
    window = PendingWindow(portal.pk, user.user_id, PENDING_WINDOW)
    for _ in range(max_rounds):
        lock.check()
        pending = window.read()
        todo = _settle_agreed(pending, stats)
        if not todo:
            if len(pending) < PENDING_WINDOW:
                return Outcome.done(stats)
            continue  # a full window of settled intents: there may be more behind it
        now = timezone.now()
        ready = {i.flow_id: i for i in todo if i.not_before is None or i.not_before <= now}
        if not ready:
            # Every flow left waits out a lost answer: come back when the first may go.
            wait = min(i.not_before for i in todo if i.not_before is not None) - now
            progress = stats["toggles"] > 0
            reason = "waiting out a lost answer"
            return Outcome.retry(wait.total_seconds(), reason, exact=True, progress=progress)
        chunk = dict(list(ready.items())[: batch.size])
        stats["rounds"] += 1
        answered = toggle_round(portal, user, chunk, stats, lock)
        if isinstance(answered, Outcome):
            return answered
        if answered == "answered":
            batch.answered(len(chunk))
            continue
        batch.lost(len(chunk))
        if batch.lost_in_a_row >= LOST_IN_A_ROW:
            # Pause between single toggles, longer the longer it lasts — but never so long that
            # the pins lag far behind once answers come again.
            pause = min(LOST_PAUSE_MAX, 2.0 ** (batch.lost_in_a_row - LOST_IN_A_ROW))
            return Outcome.retry(pause, "answers keep being lost", exact=True)
    # A bounded run keeps one thread from holding one user for long; carry on at once.
    return Outcome.retry(0.0, "more pins than one run converges", exact=True, progress=True)
