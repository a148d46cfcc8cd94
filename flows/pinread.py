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

import logging
from datetime import datetime

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from b24app import tokens
from b24app.bitrix.client import BATCH_LIMIT
from b24app.bitrix.errors import (
    AccessDenied,
    BitrixError,
    ResponseLost,
    TransientError,
)
from b24app.models import Portal, PortalUser
from b24app.redisconn import redis_client
from flows import pairs, remote, snapshots
from flows.lock import UserLock
from flows.models import PinIntent, PinRead
from flows.outcome import Kind, Outcome
from flows.toggles import limit_wait, quiet_period

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
    """Every (portal, user) with a read asked for, not finished, and their list there to read
    it by (a sweep resumes them; a list that never comes starts none)."""
    if not settings.FLOWPINS_READ_PINS:
        return []
    asked = PinRead.objects.filter(requested_at__isnull=False).values_list("portal_id", "user_id")
    return [(p, u) for p, u in asked if snapshots.status(p, u).exists]


def ready(portal_id: int, user_id: int) -> bool:
    """A read is wanted and the user's list is there to read it by. Asked at the end of every
    convergence run: the Redis marker (no read: no database query) first."""
    return (
        settings.FLOWPINS_READ_PINS
        and in_flight(portal_id, user_id)
        and PinRead.objects.filter(
            portal_id=portal_id, user_id=user_id, requested_at__isnull=False
        ).exists()
        and snapshots.status(portal_id, user_id).exists
    )


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


def _finished(portal: Portal, user_id: int, asked_at: datetime) -> None:
    """The read asked for at `asked_at` is done (a newer ask stays wanted)."""
    PinRead.objects.filter(portal=portal, user_id=user_id, requested_at=asked_at).update(
        requested_at=None, read_at=timezone.now()
    )
    redis_client().delete(_reading_key(portal.pk, user_id))
    # A new version: the open page fetches its rows again and shows what was read.
    snapshots.update(portal, user_id, lambda current: current)


def _given_up(portal: Portal, user_id: int, asked_at: datetime | None) -> None:
    """A read that cannot go on (or is turned off) is no longer asked for; its flows stay "not
    read yet" until the user asks again (Check pins in Bitrix24)."""
    PinRead.objects.filter(portal=portal, user_id=user_id, requested_at=asked_at).update(
        requested_at=None
    )
    redis_client().delete(_reading_key(portal.pk, user_id))


def read_rounds(
    portal: Portal, user: PortalUser, stats: dict[str, int], lock: UserLock, rounds: int = 8
) -> Outcome | None:
    """Read what is wanted, a request of 25 flows at a time (at most `rounds`). None when the
    read is done (or none was asked for); else when to come back for the rest (FINAL: never)."""
    asked = PinRead.objects.filter(portal=portal, user_id=user.user_id).first()
    if asked is None or asked.requested_at is None:
        redis_client().delete(_reading_key(portal.pk, user.user_id))  # a stale marker
        return None
    if not settings.FLOWPINS_READ_PINS:
        _given_up(portal, user.user_id, asked.requested_at)
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
            _finished(portal, user.user_id, asked.requested_at)
            return None
        stopped = _read_once(user, wanted[:PAIRS_PER_REQUEST], stats)
        if stopped is not None and stopped.kind is Kind.FINAL:
            _given_up(portal, user.user_id, asked.requested_at)  # a reopen, say
        if stopped is not None:
            return stopped
    return Outcome.retry(0.0, "more pins to read than one run reads", exact=True, progress=True)


def _read_once(user: PortalUser, flow_ids: list[int], stats: dict[str, int]) -> Outcome | None:
    """One request of pairs (and, for a flow toggled once without a readable answer, one more
    toggle). Its answers are recorded even if the run's lock lapsed meanwhile: a broken pair
    left a flow flipped, and only this answer says so."""
    progress = stats["toggles"] > 0 or stats["reads"] > 0
    try:
        result = tokens.call_with_user(
            user,
            lambda client, token: pairs.batch_of_pairs(client, token, flow_ids),
            max_wait=0.6,
            bulk=True,
        )
    except BitrixError as exc:
        return _request_failed(exc, progress=progress)
    answers = [pairs.pair_answer(fid, result.results, result.errors) for fid in flow_ids]
    answers = _follow_up(user, answers)
    pairs.record(user.portal_id, user.user_id, answers)
    stats["reads"] += 1
    stop = next((e for e in result.errors.values() if _stops_the_read(e)), None)
    if stop is not None:  # every flow would be refused the same way: one request each
        log.info("reading pins stopped: %s", stop.code)
        return Outcome.final(stop.problem)
    if all(a.seen is pairs.Seen.UNTOUCHED for a in answers):
        return Outcome.retry(2.0, "a read command failed", progress=progress)
    return None


def _stops_the_read(exc: BitrixError) -> bool:
    return not exc.transient and not isinstance(exc, AccessDenied)


def _follow_up(user: PortalUser, answers: list[pairs.PairAnswer]) -> list[pairs.PairAnswer]:
    """A flow toggled once with no readable answer gets its second toggle now: that answer is
    the user's state, and the pin is as it was. If it fails too, the flow is left UNKNOWN
    (flipped or not) and logged: nothing the app can learn says which."""
    once = [a.flow_id for a in answers if a.seen is pairs.Seen.ONCE]
    if not once:
        return answers
    try:
        toggled = tokens.call_with_user(
            user,
            lambda client, token: remote.pin_toggle_many(client, token, once),
            max_wait=3.0,
            bulk=True,
        )
    except BitrixError as exc:
        log.warning("a read left %d flow(s) toggled once: %s", len(once), exc.code)
        toggled = {}
    done: dict[int, pairs.PairAnswer] = {}
    for fid in once:
        state = toggled.get(fid)
        done[fid] = (
            pairs.PairAnswer(fid, pairs.Seen.KNOWN, state)
            if isinstance(state, bool)
            else pairs.PairAnswer(fid, pairs.Seen.UNKNOWN)
        )
    return [done.get(a.flow_id, a) for a in answers]


def _request_failed(exc: BitrixError, *, progress: bool) -> Outcome:
    """A read request that failed as a whole ran none of its commands — or, its answer lost,
    all of them (a batch runs to its end): nothing is recorded and the flows are read again,
    after a lost answer only once the portal must be done with the request."""
    if (limited := limit_wait(exc, progress=progress)) is not None:
        return limited
    if isinstance(exc, ResponseLost):
        return Outcome.retry(quiet_period(exc), "a read's answer was lost", exact=True)
    if isinstance(exc, TransientError):
        return Outcome.retry(2.0, "reading pins: portal unavailable", progress=progress)
    log.info("reading pins failed permanently: %s", exc.code)
    return Outcome.final(exc.problem)
