"""Decide and write: the flows a user sees (with a short-lived snapshot), pin intents, and the
convergence of a user's pins to their intents.

`tasks.flow.Flow.pin` toggles, and its boolean answer is the only way to read the state. So a
click only records the desired state; `converge_user` calls pin while the last answer differs
from the latest desired state, records every answer, and never "pins again to be safe". A lost
answer makes the state unknown (None) — the next answer tells the truth.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Value
from django.utils import timezone
from redis.exceptions import RedisError, WatchError

from b24app import tokens
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
    ResponseLost,
    TransientError,
)
from b24app.models import Portal, PortalUser
from b24app.redisconn import redis_client
from flows import remote
from flows.models import Flow, PinIntent

log = logging.getLogger(__name__)

SNAPSHOT_TTL = 600  # seconds a snapshot may be shown at all
SNAPSHOT_FRESH = 20  # seconds before a shown snapshot triggers a background refresh
MAX_TOGGLES = 6  # pin calls for one click before we stop and say so
LOCK_TTL_MS = 120_000
PENDING_WINDOW = 4 * BATCH_LIMIT  # intents looked at per round
# A run waits this long at most for the portal's bucket (one slot at the default 2/s); longer,
# and it steps aside (RetryLater) so its worker serves other portals meanwhile.
LIMITER_WAIT = 0.6
# A round of at most this many toggles is interactive (a click or two) and may use the slots of
# the portal's bucket that bulk rounds ("Pin all") leave free.
INTERACTIVE_TOGGLES = 3
# After this many lost answers in a row the portal, or the way to it, is losing everything (and
# each lost toggle may still have been applied): the run pauses between single toggles, 1, 2, 4
# … at most LOST_PAUSE_MAX seconds, so it neither hammers the portal nor lags once it recovers.
LOST_IN_A_ROW = 12
LOST_PAUSE_MAX = 5.0


# --- the flows a user sees --------------------------------------------------------------------


@dataclass
class Snapshot:
    flows: list[dict[str, Any]]
    fetched_at: float  # when the fetch that produced it started
    source: str  # "list" or "tasks" (older portals)
    # Bumped by every write (a fetch landing, a flow added by id): a page compares it to the
    # one it shows; later writes have higher versions.
    version: int = 0
    # Flows added by id since the list was fetched, and when: a fetch that started before an
    # add keeps them (its list may predate the add), a later one tells the truth.
    added: dict[str, float] = field(default_factory=dict)

    @property
    def age(self) -> float:
        return time.time() - self.fetched_at


@dataclass
class SnapshotMeta:
    """What a page polling for changes needs: small, read without the flows."""

    version: int
    fetched_at: float

    @property
    def age(self) -> float:
        return time.time() - self.fetched_at


VERSION_TTL = 86400  # the version counter outlives any snapshot and any page token


def _snapshot_key(portal: Portal, user_id: int) -> str:
    return f"fp:snap:{portal.pk}:{user_id}"


def _snapshot_meta_key(portal: Portal, user_id: int) -> str:
    return f"fp:snapmeta:{portal.pk}:{user_id}"


def _snapshot_version_key(portal: Portal, user_id: int) -> str:
    return f"fp:snapver:{portal.pk}:{user_id}"


def _snapshot_load(raw: bytes | str | None) -> Snapshot | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return Snapshot(
        flows=data["flows"],
        fetched_at=data["fetched_at"],
        source=data["source"],
        version=int(data.get("version", 0)),
        added=dict(data.get("added") or {}),
    )


def snapshot_get(portal: Portal, user_id: int) -> Snapshot | None:
    return _snapshot_load(redis_client().get(_snapshot_key(portal, user_id)))


def _meta_load(raw: bytes | str | None) -> SnapshotMeta | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return SnapshotMeta(version=int(data["version"]), fetched_at=float(data["fetched_at"]))


def snapshot_meta(portal: Portal, user_id: int) -> SnapshotMeta | None:
    return _meta_load(redis_client().get(_snapshot_meta_key(portal, user_id)))


@dataclass
class SnapshotStatus:
    """What a page render needs before the flows: the snapshot's version (None: no snapshot,
    or one written before snapshots had versions) and why the last fetch failed."""

    meta: SnapshotMeta | None
    exists: bool
    problem: str


def snapshot_status(portal: Portal, user_id: int) -> SnapshotStatus:
    """The snapshot's meta, whether the snapshot is there and the last fetch's problem, in one
    round trip (the snapshot itself, tens of kilobytes, is not read)."""
    with redis_client().pipeline(transaction=False) as pipe:
        pipe.get(_snapshot_meta_key(portal, user_id))
        pipe.exists(_snapshot_key(portal, user_id))
        pipe.get(_snapshot_problem_key(portal, user_id))
        raw_meta, exists, raw_problem = pipe.execute()
    meta = _meta_load(raw_meta) if exists else None
    problem = raw_problem.decode() if isinstance(raw_problem, bytes) else ""
    return SnapshotStatus(meta=meta, exists=bool(exists), problem=problem)


def _snapshot_update(
    portal: Portal, user_id: int, change: Callable[[Snapshot | None], Snapshot | None]
) -> Snapshot | None:
    """Write `change(current)` (None: leave it) with the next version, atomically: a fetch
    landing and an add by id at the same moment cannot drop each other's flows, and the
    versions of the writes that land grow in the order they land (the version is taken after
    the WATCH, so a write that lands later was given a higher one)."""
    key = _snapshot_key(portal, user_id)
    version_key = _snapshot_version_key(portal, user_id)
    with redis_client().pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]  # untyped in redis-py
                current = _snapshot_load(pipe.get(key))
                new = change(current)
                if new is None:
                    pipe.reset()
                    return current
                new.version = int(pipe.incr(version_key))
                pipe.multi()
                pipe.set(key, json.dumps(asdict(new)), ex=SNAPSHOT_TTL)
                pipe.set(
                    _snapshot_meta_key(portal, user_id),
                    json.dumps({"version": new.version, "fetched_at": new.fetched_at}),
                    ex=SNAPSHOT_TTL,
                )
                pipe.expire(version_key, VERSION_TTL)
                pipe.execute()
                return new
            except WatchError:
                continue


def _snapshot_put(portal: Portal, user_id: int, snap: Snapshot, *, started: float) -> Snapshot:
    """Store a fetched list. Flows added by id after the fetch started stay in it."""

    def merge(current: Snapshot | None) -> Snapshot:
        if current is not None:
            listed = {f["id"] for f in snap.flows}
            for flow in current.flows:
                added_at = current.added.get(str(flow["id"]))
                if added_at is not None and added_at >= started and flow["id"] not in listed:
                    snap.flows.append(flow)
                    snap.added[str(flow["id"])] = added_at
        return snap

    stored = _snapshot_update(portal, user_id, merge)
    assert stored is not None
    return stored


def _remember(portal: Portal, flows: Iterable[remote.FlowInfo], source: str) -> None:
    """Remember flows learnt per portal, so a known flow without a visible task is not lost.

    One upsert statement per call, however many flows (a page render may bring thousands).
    """
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


def _snapshot_problem_key(portal: Portal, user_id: int) -> str:
    return f"fp:snapfail:{portal.pk}:{user_id}"


def snapshot_failed(portal: Portal, user_id: int, exc: BaseException) -> str:
    """Remember why the last fetch of this user's list failed, for the page that waits on it."""
    if isinstance(exc, tokens.ReopenRequired):
        problem = "reopen"
    elif isinstance(exc, tokens.ReinstallRequired):
        problem = "reinstall"
    elif isinstance(exc, TransientError):
        problem = "busy"
    else:
        problem = "failed"
    redis_client().set(_snapshot_problem_key(portal, user_id), problem, ex=SNAPSHOT_FRESH)
    return problem


def snapshot_problem(portal: Portal, user_id: int) -> str:
    raw = redis_client().get(_snapshot_problem_key(portal, user_id))
    return raw.decode() if isinstance(raw, bytes) else ""


def flows_fetch(portal: Portal, user: PortalUser, *, bulk: bool = False) -> Snapshot:
    """Ask the portal which flows this user sees: one call per 50 flows.

    Flow.list where the portal has it; on older portals, the flow ids of the user's tasks plus
    every flow this portal is known to have, read with Flow.get in batches of 50 (a flow the user
    cannot see answers "access denied" and is left out).
    """

    def fetch(client: Any, token: str) -> Snapshot:
        try:
            found = remote.flow_list(client, token)
            _remember(portal, found, Flow.Source.LIST)
            return Snapshot([_flow_dict(f) for f in found], time.time(), "list")
        except MethodNotFound:
            pass
        ids = remote.flow_ids_from_tasks(client, token)
        ids |= set(Flow.objects.filter(portal=portal).values_list("flow_id", flat=True))
        got, _ = remote.flow_get_many(client, token, ids)
        _remember(portal, got.values(), Flow.Source.TASK)
        return Snapshot([_flow_dict(got[i]) for i in sorted(got)], time.time(), "tasks")

    started = time.time()
    snap = tokens.call_with_user(user, fetch, max_wait=3.0, bulk=bulk)
    snap.fetched_at = started  # the list is as of when it was asked for, not when it arrived
    snap = _snapshot_put(portal, user.user_id, snap, started=started)
    redis_client().delete(_snapshot_problem_key(portal, user.user_id))
    return snap


def _flow_dict(info: remote.FlowInfo) -> dict[str, Any]:
    return {
        "id": info.flow_id,
        "name": info.name,
        "active": info.active,
        "efficiency": info.efficiency,
    }


def flow_add_by_id(
    portal: Portal, user: PortalUser, flow_id: int, *, deadline: bool = False
) -> remote.FlowInfo:
    """A user adds a flow by its id or link: read it as that user (proves they can see it).

    `deadline`: asked from a web request, so wait for the portal no longer than
    B24_WEB_TIMEOUT (a slower answer is a transient error; the caller hands the job to a worker).
    """

    def get(client: Any, token: str) -> remote.FlowInfo:
        found, failed = remote.flow_get_many(client, token, [flow_id])
        if flow_id in failed:
            raise failed[flow_id]
        return found[flow_id]

    info = tokens.call_with_user(
        user,
        get,
        max_wait=1.0 if deadline else 3.0,
        timeout=settings.B24_WEB_TIMEOUT if deadline else None,
    )
    Flow.objects.update_or_create(
        portal=portal,
        flow_id=info.flow_id,
        defaults={"name": info.name[:500], "active": info.active, "efficiency": info.efficiency},
        create_defaults={
            "name": info.name[:500],
            "active": info.active,
            "efficiency": info.efficiency,
            "source": Flow.Source.USER,
        },
    )

    def append(current: Snapshot | None) -> Snapshot | None:
        if current is None or any(f["id"] == info.flow_id for f in current.flows):
            return None
        current.flows.append(_flow_dict(info))
        current.added[str(info.flow_id)] = time.time()
        return current

    _snapshot_update(portal, user.user_id, append)
    return info


# --- intents ----------------------------------------------------------------------------------


def _portal_id(portal: Portal | int) -> int:
    return portal if isinstance(portal, int) else portal.pk


class NotRecorded(Exception):
    """A click recorded nothing: some flow is not known on the portal, the portal is not active
    or the user never opened the app. The caller finds out which (the rare, slow path)."""


@functools.lru_cache(maxsize=512)  # built once per number of flows (a click: 1)
def _pin_upsert_sql(count: int) -> str:
    qn = connection.ops.quote_name
    intent, flow = qn(PinIntent._meta.db_table), qn(Flow._meta.db_table)
    portal, user = qn(Portal._meta.db_table), qn(PortalUser._meta.db_table)
    ids = ", ".join(["(%s)"] * count)
    # Unless told to record anything (the first parameter): every row or none, and only when
    # each flow named is known on the portal and the portal is active with this user in it.
    # New rows start at seq 1 (created, then clicked). Only our own table names and
    # placeholders go into the text; every value is a parameter.
    return f"""
        WITH ids (flow_id) AS (VALUES {ids})
        INSERT INTO {intent} (portal_id, user_id, flow_id, desired, seq, observed, observed_at,
                              status, problem, toggles, created_at, updated_at)
        SELECT %s, %s, ids.flow_id, %s, 1, NULL, NULL, %s, '', 0, %s, %s
        FROM ids
        WHERE %s OR (
            (SELECT COUNT(*) FROM {flow} k
             WHERE k.portal_id = %s AND k.flow_id IN (SELECT flow_id FROM ids)) = %s
            AND EXISTS (SELECT 1 FROM {user} u JOIN {portal} p ON p.id = u.portal_id
                        WHERE u.portal_id = %s AND u.user_id = %s AND p.state = %s)
        )
        ON CONFLICT (portal_id, user_id, flow_id) DO UPDATE SET
            desired = excluded.desired, seq = {intent}.seq + 1, toggles = 0, problem = '',
            status = excluded.status, updated_at = excluded.updated_at
        RETURNING id, flow_id, desired, seq, observed, status, problem
    """  # noqa: S608


def pin_intent_set(
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
        cursor.execute(_pin_upsert_sql(len(flow_ids)), params)
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
            seq=seq,
            observed=None if seen is None else bool(seen),
            status=status,
            problem=problem,
            toggles=0,
            updated_at=now,
        )
        for pk, flow_id, want, seq, seen, status, problem in rows
    ]


# At most this many of one user's intents wait at a time: far above any real portal's flows,
# but a bound on what one user (or a replayed request) can make the workers do.
MAX_PENDING_PER_USER = 5000


class TooMuchPending(Exception):
    """The user already has MAX_PENDING_PER_USER pins waiting."""


def unknown_flows(portal: Portal | int, flow_ids: list[int]) -> list[int]:
    """The ids among `flow_ids` this portal was never seen to have (by a list or an add)."""
    portal_id = _portal_id(portal)
    known = set(
        Flow.objects.filter(portal_id=portal_id, flow_id__in=flow_ids).values_list(
            "flow_id", flat=True
        )
    )
    return [fid for fid in flow_ids if fid not in known]


def check_pending_room(portal: Portal | int, user_id: int, adding: int) -> None:
    portal_id = _portal_id(portal)
    pending = PinIntent.objects.filter(
        portal_id=portal_id, user_id=user_id, status=PinIntent.Status.PENDING
    ).count()
    if pending + adding > MAX_PENDING_PER_USER:
        raise TooMuchPending(pending)


def prune_settled_intents(*, days: int | None = None) -> int:
    """Delete settled intents older than the retention. A pinned flow's row stays: it is what
    the page knows of that pin; an unpinned or unknown one tells nothing a missing row does not."""
    keep = days if days is not None else settings.FLOWPINS_INTENT_DAYS
    cutoff = timezone.now() - timedelta(days=keep)
    deleted, _ = (
        PinIntent.objects.exclude(status=PinIntent.Status.PENDING)
        .filter(updated_at__lt=cutoff)
        .exclude(status=PinIntent.Status.DONE, observed=True)
        .delete()
    )
    return deleted


def fail_pending(portal_id: int, user_id: int, problem: str) -> int:
    return PinIntent.objects.filter(
        portal_id=portal_id, user_id=user_id, status=PinIntent.Status.PENDING
    ).update(status=PinIntent.Status.FAILED, problem=problem, updated_at=timezone.now())


def cancel_portal_work(portal: Portal) -> int:
    return PinIntent.objects.filter(portal=portal, status=PinIntent.Status.PENDING).update(
        status=PinIntent.Status.FAILED, problem=PinIntent.Problem.REINSTALL
    )


# --- convergence ------------------------------------------------------------------------------


class Busy(Exception):
    """Another worker is converging this user's pins right now."""


class RetryLater(Exception):
    """Stop this run; try again in `delay` seconds (negative: do not, it is final).

    `exact`: come back exactly then — the portal's bucket has room, a lost answer's quiet period
    is over, or a bounded run has more to do; not an outage, so no backoff grows. `progress`:
    this run had answers from the portal, so whatever failed before it is over (the backoff
    starts afresh).
    """

    def __init__(
        self, delay: float, reason: str, *, exact: bool = False, progress: bool = False
    ) -> None:
        super().__init__(reason)
        self.delay = delay
        self.exact = exact
        self.progress = progress


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


class LockLost(Exception):
    """The run's lock lapsed or was taken over: it must not toggle or record anything more."""


_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
"""


class _Lock:
    """A Redis lock per (portal, user): one converger at a time, so answers are never mixed.

    A heartbeat renews it every third of its TTL for as long as the run holds it, however slow
    the portal's answers (a round can outlast the TTL), and keeps the run's other keys (the
    queued marker) alive with it. When a renewal finds the lock gone (taken over after Redis
    lost it, say) or cannot reach Redis for most of a TTL, the run stops before its next write.

    Its value names the holder (the Celery node), so a node restarted after a crash frees what
    its killed predecessor held at once (`release_locks_of`) instead of waiting out the TTL.
    """

    def __init__(
        self,
        portal_id: int,
        user_id: int,
        holder: str = "",
        *,
        ttl_ms: int | None = None,
        keep_alive: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.key = f"fp:conv:{portal_id}:{user_id}"
        self.token = f"{holder}|{uuid.uuid4().hex}"
        self.ttl_ms = ttl_ms or LOCK_TTL_MS
        self.keep_alive = keep_alive
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._valid_until = 0.0
        self._beat: threading.Thread | None = None

    def __enter__(self) -> _Lock:
        if not redis_client().set(self.key, self.token, nx=True, px=self.ttl_ms):
            raise Busy(self.key)
        self._valid_until = time.monotonic() + self.ttl_ms / 1000
        self._beat = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            started = time.monotonic()
            try:
                held = redis_client().eval(
                    _RENEW,
                    1 + len(self.keep_alive),
                    self.key,
                    *(key for key, _ in self.keep_alive),
                    self.token,
                    self.ttl_ms,
                    max([ttl for _, ttl in self.keep_alive], default=60),
                )
            except RedisError:
                continue  # check() stops the run once the last renewal is too old
            if not held:
                self._lost.set()
                return
            self._valid_until = started + self.ttl_ms / 1000

    def check(self) -> None:
        """Raise LockLost unless the lock is surely still ours for a while (a fifth of its TTL)."""
        margin = self.ttl_ms / 5000
        if self._lost.is_set() or time.monotonic() > self._valid_until - margin:
            raise LockLost(self.key)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
        script = (
            "if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) else return 0 end"
        )
        try:
            redis_client().eval(script, 1, self.key, self.token)
        except RedisError:
            log.warning("could not release a convergence lock; it lapses with its TTL")


def release_locks_of(holder: str) -> int:
    """Free the convergence locks held by `holder`. Only for a node that is starting and has run
    nothing yet: whatever it holds was left by a killed process (node names are unique)."""
    if not holder:
        return 0
    script = (
        "local v = redis.call('GET', KEYS[1]) "
        "if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then "
        "return redis.call('DEL', KEYS[1]) end return 0"
    )
    client = redis_client()
    return sum(
        int(client.eval(script, 1, key, f"{holder}|"))
        for key in client.scan_iter(match="fp:conv:*", count=500)
    )


def _record_answers(
    answers: dict[int, bool | None],
    pending: dict[int, PinIntent],
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
    with transaction.atomic():
        for observed, pks in by_answer.items():
            counted = F("toggles") + 1 if observed is not None or count else Value(0)
            rows = PinIntent.objects.filter(pk__in=pks)
            if only_pending:
                rows = rows.filter(status=PinIntent.Status.PENDING)
            rows.update(
                observed=observed,
                observed_at=now,
                toggles=counted,
                not_before=not_before,
                updated_at=now,
            )


def _finish(intent_ids: list[int], status: str, problem: str, **still: Any) -> None:
    """Close pending intents. `still` re-checks, in the same UPDATE, what the verdict rests on:
    a click that landed after the intents were read must not be closed with a stale verdict."""
    if intent_ids:
        PinIntent.objects.filter(
            pk__in=intent_ids, status=PinIntent.Status.PENDING, **still
        ).update(status=status, problem=problem, updated_at=timezone.now())


def _mark_problem(intent_ids: list[int], problem: str) -> None:
    PinIntent.objects.filter(pk__in=intent_ids, status=PinIntent.Status.PENDING).update(
        problem=problem, updated_at=timezone.now()
    )


def converge_user(
    portal_id: int,
    user_id: int,
    *,
    max_rounds: int = 40,
    holder: str = "",
    keep_alive: tuple[tuple[str, int], ...] = (),
    lock_ttl_ms: int | None = None,
) -> dict[str, int]:
    """Bring every pending pin of one user in line with their intents.

    Each round takes what is pending (at most 50), marks the converged ones done, and toggles the
    others in one request (a batch when there are several). Answers are recorded by flow id;
    whatever still differs goes round again. Raises RetryLater for rate limits and outages.
    """
    stats = {"rounds": 0, "toggles": 0, "done": 0, "failed": 0}
    portal = Portal.objects.filter(pk=portal_id).first()
    user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
    if portal is None or user is None:
        return stats
    batch = BatchSize(portal_id, user_id)
    with _Lock(portal_id, user_id, holder, ttl_ms=lock_ttl_ms, keep_alive=keep_alive) as lock:
        try:
            _converge_rounds(portal, user, stats, lock, batch, max_rounds)
        finally:
            batch.save()
    return stats


def _converge_rounds(
    portal: Portal,
    user: PortalUser,
    stats: dict[str, int],
    lock: _Lock,
    batch: BatchSize,
    max_rounds: int,
) -> None:
    portal_id, user_id = portal.pk, user.user_id
    for _ in range(max_rounds):
        lock.check()
        pending = list(
            PinIntent.objects.filter(
                portal_id=portal_id,
                user_id=user_id,
                status=PinIntent.Status.PENDING,
            ).order_by("updated_at", "pk")[:PENDING_WINDOW]
        )
        done = [i.pk for i in pending if i.converged]
        _finish(done, PinIntent.Status.DONE, "", observed=F("desired"))
        stats["done"] += len(done)
        exhausted = [i.pk for i in pending if not i.converged and i.toggles >= MAX_TOGGLES]
        _finish(
            exhausted,
            PinIntent.Status.FAILED,
            PinIntent.Problem.GAVE_UP,
            toggles__gte=MAX_TOGGLES,
        )
        stats["failed"] += len(exhausted)
        todo = [i for i in pending if not i.converged and i.toggles < MAX_TOGGLES]
        if not todo:
            if len(pending) < PENDING_WINDOW:
                return
            continue  # a full window of settled intents: there may be more behind it
        now = timezone.now()
        ready = {i.flow_id: i for i in todo if i.not_before is None or i.not_before <= now}
        if not ready:
            # Every flow left waits out a lost answer: come back when the first may go.
            wait = min(i.not_before for i in todo if i.not_before is not None) - now
            raise RetryLater(
                wait.total_seconds(),
                "waiting out a lost answer",
                exact=True,
                progress=stats["toggles"] > 0,
            )
        chunk = dict(list(ready.items())[: batch.size])
        stats["rounds"] += 1
        if _toggle_round(portal, user, chunk, stats, lock):
            batch.answered(len(chunk))
            continue
        batch.lost(len(chunk))
        if batch.lost_in_a_row >= LOST_IN_A_ROW:
            # Pause between single toggles, longer the longer it lasts — but never so long that
            # the pins lag far behind once answers come again.
            pause = min(LOST_PAUSE_MAX, 2.0 ** (batch.lost_in_a_row - LOST_IN_A_ROW))
            raise RetryLater(pause, "answers keep being lost", exact=True)
    # A bounded run keeps one thread from holding one user for long; carry on at once.
    raise RetryLater(0.0, "more pins than one run converges", exact=True, progress=True)


def _toggle_round(
    portal: Portal,
    user: PortalUser,
    chunk: dict[int, PinIntent],
    stats: dict[str, int],
    lock: _Lock,
) -> bool:
    """One request for `chunk`. False when its answer was lost (the flows wait out a quiet
    period, their state unknown); True when the portal answered, whatever it said."""
    ids = list(chunk)
    pks = [i.pk for i in chunk.values()]

    def toggle(client: Any, token: str) -> dict[int, bool | BitrixError]:
        if len(ids) > 1:
            return remote.pin_toggle_many(client, token, ids)
        try:
            return {ids[0]: remote.pin_toggle(client, token, ids[0])}
        except (AccessDenied, BadRequest, MethodNotFound, MalformedAnswer) as exc:
            return {ids[0]: exc}  # this flow's own answer

    bulk = len(ids) > INTERACTIVE_TOGGLES  # leaves a few slots of the bucket to single clicks
    progress = stats["toggles"] > 0
    try:
        answers = tokens.call_with_user(user, toggle, max_wait=LIMITER_WAIT, bulk=bulk)
        lock.check()  # the lock held through the call: these answers are the latest
    except LockLost:
        # Another run may own these flows now: claim nothing, leave their state unknown.
        _record_answers({fid: None for fid in ids}, chunk, only_pending=True)
        raise
    except tokens.ReopenRequired:
        _finish(
            _pending_pks(portal.pk, user.user_id), PinIntent.Status.FAILED, PinIntent.Problem.REOPEN
        )
        stats["failed"] += len(pks)
        raise RetryLater(-1, "reopen") from None
    except tokens.ReinstallRequired:
        _finish(
            _pending_pks(portal.pk, user.user_id),
            PinIntent.Status.FAILED,
            PinIntent.Problem.REINSTALL,
        )
        raise RetryLater(-1, "reinstall") from None
    except RateLimited as exc:
        _mark_problem(pks, PinIntent.Problem.RATE_LIMITED)
        raise RetryLater(exc.retry_after, "rate limited", exact=True, progress=progress) from None
    except OperationTimeLimit as exc:
        _mark_problem(pks, PinIntent.Problem.RATE_LIMITED)
        raise RetryLater(
            max(1.0, exc.reset_at - time.time()),
            "operating time limit",
            exact=True,
            progress=progress,
        ) from None
    except ResponseLost as exc:
        # The toggles may or may not have happened: the state is unknown until the next answer,
        # and these flows wait until the portal must be done with them; the others go on.
        quiet_until = timezone.now() + timedelta(seconds=_quiet_period(exc))
        _record_answers({fid: None for fid in ids}, chunk, not_before=quiet_until)
        _mark_problem(pks, PinIntent.Problem.UNAVAILABLE)
        return False
    except TransientError:
        _mark_problem(pks, PinIntent.Problem.UNAVAILABLE)
        raise RetryLater(2.0, "portal unavailable", progress=progress) from None
    except PortalGone:
        tokens.mark_portal_needs_reinstall(portal.pk, "the portal refused the app")
        _finish(
            _pending_pks(portal.pk, user.user_id),
            PinIntent.Status.FAILED,
            PinIntent.Problem.REINSTALL,
        )
        raise RetryLater(-1, "reinstall") from None
    except BitrixError as exc:  # permanent, for the whole request
        log.warning("pin request failed permanently: %s", exc.code)
        _finish(pks, PinIntent.Status.FAILED, PinIntent.Problem.GAVE_UP)
        stats["failed"] += len(pks)
        return True

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
        elif isinstance(answer, AccessDenied):
            denied.append(chunk[fid].pk)
        elif isinstance(answer, TransientError):
            transient_failure = True  # not executed (or unknown): try again next round
        else:
            denied.append(chunk[fid].pk)
            log.warning("pin of flow %s failed permanently: %s", fid, answer.code)
    if observed:
        _record_answers(observed, chunk)
    if unreadable:
        _record_answers(unreadable, chunk, count=True)
    if denied:
        _finish(denied, PinIntent.Status.FAILED, PinIntent.Problem.DENIED)
        stats["failed"] += len(denied)
    if transient_failure and not observed and not unreadable:
        raise RetryLater(2.0, "sub-commands failed", progress=progress)
    return True


def _quiet_period(exc: ResponseLost) -> float:
    """How long to leave a flow alone after a toggle whose answer was lost.

    A closed connection means the portal is done with the request. A read timeout does not: the
    portal may still be running it, and a toggle sent now could be answered before that one
    lands — the one interleaving that leaves a wrong state. So wait until the portal must have
    finished it (its own per-request limit), then ask.
    """
    if exc.code == "READ_TIMEOUT":
        return max(1.0, settings.B24_PORTAL_REQUEST_SECONDS - settings.B24_HTTP_TIMEOUT[1] + 1.0)
    return 1.0


def _pending_pks(portal_id: int, user_id: int) -> list[int]:
    return list(
        PinIntent.objects.filter(
            portal_id=portal_id, user_id=user_id, status=PinIntent.Status.PENDING
        ).values_list("pk", flat=True)
    )


def has_pending(portal_id: int, user_id: int) -> bool:
    return PinIntent.objects.filter(
        portal_id=portal_id, user_id=user_id, status=PinIntent.Status.PENDING
    ).exists()


def pending_users() -> list[tuple[int, int]]:
    """Every (portal, user) with work left: what a restarted worker picks up again."""
    return list(
        PinIntent.objects.filter(status=PinIntent.Status.PENDING)
        .values_list("portal_id", "user_id")
        .distinct()
    )
