"""The flows a user sees, kept in Redis as a short-lived snapshot per user.

A snapshot is written whole by a fetch (`flows.listing`) and grows by one row when a user adds a
flow by id. Every write bumps the snapshot's version, which the open page compares with the one
it shows. Also here: why the last fetch failed, and which refreshes are in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import WatchError

from b24app.models import Portal
from b24app.redisconn import redis_client
from flows.remote import FlowRow

SNAPSHOT_TTL = 600  # seconds a snapshot may be shown at all
SNAPSHOT_FRESH = 20  # seconds a fetch's failure is remembered for the page waiting on it
VERSION_TTL = 86400  # the version counter outlives any snapshot and any page token
REFRESH_TTL = 120  # seconds a refresh may be in flight before another may start


@dataclass
class Snapshot:
    flows: list[FlowRow]
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

    def to_json(self) -> str:
        return json.dumps(
            {
                "flows": [row.as_json() for row in self.flows],
                "fetched_at": self.fetched_at,
                "source": self.source,
                "version": self.version,
                "added": self.added,
            }
        )


@dataclass
class SnapshotMeta:
    """What a page polling for changes needs: small, read without the flows."""

    version: int
    fetched_at: float

    @property
    def age(self) -> float:
        return time.time() - self.fetched_at


@dataclass
class SnapshotStatus:
    """What a page render needs before the flows: the snapshot's version (None: no snapshot,
    or one written before snapshots had versions) and why the last fetch failed."""

    meta: SnapshotMeta | None
    exists: bool
    problem: str


def _key(kind: str, portal: Portal | int, user_id: int) -> str:
    portal_id = portal if isinstance(portal, int) else portal.pk
    return f"fp:{kind}:{portal_id}:{user_id}"


def snapshot_key(portal: Portal | int, user_id: int) -> str:
    return _key("snap", portal, user_id)


def meta_key(portal: Portal | int, user_id: int) -> str:
    return _key("snapmeta", portal, user_id)


def _load(raw: bytes | str | None) -> Snapshot | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return Snapshot(
        flows=[FlowRow.from_json(row) for row in data["flows"]],
        fetched_at=data["fetched_at"],
        source=data["source"],
        version=int(data.get("version", 0)),
        added=dict(data.get("added") or {}),
    )


def _meta_load(raw: bytes | str | None) -> SnapshotMeta | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return SnapshotMeta(version=int(data["version"]), fetched_at=float(data["fetched_at"]))


def get(portal: Portal | int, user_id: int) -> Snapshot | None:
    return _load(redis_client().get(snapshot_key(portal, user_id)))


def meta(portal: Portal | int, user_id: int) -> SnapshotMeta | None:
    return _meta_load(redis_client().get(meta_key(portal, user_id)))


def status(portal: Portal | int, user_id: int) -> SnapshotStatus:
    """The snapshot's meta, whether the snapshot is there and the last fetch's problem, in one
    round trip (the snapshot itself, tens of kilobytes, is not read)."""
    with redis_client().pipeline(transaction=False) as pipe:
        pipe.get(meta_key(portal, user_id))
        pipe.exists(snapshot_key(portal, user_id))
        pipe.get(_key("snapfail", portal, user_id))
        raw_meta, exists, raw_problem = pipe.execute()
    found = _meta_load(raw_meta) if exists else None
    problem = raw_problem.decode() if isinstance(raw_problem, bytes) else ""
    return SnapshotStatus(meta=found, exists=bool(exists), problem=problem)


def update(
    portal: Portal | int, user_id: int, change: Callable[[Snapshot | None], Snapshot | None]
) -> Snapshot | None:
    """Write `change(current)` (None: leave it) with the next version, atomically: a fetch
    landing and an add by id at the same moment cannot drop each other's flows, and the
    versions of the writes that land grow in the order they land (the version is taken after
    the WATCH, so a write that lands later was given a higher one)."""
    key, version_key = snapshot_key(portal, user_id), _key("snapver", portal, user_id)
    with redis_client().pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]  # untyped in redis-py
                current = _load(pipe.get(key))
                new = change(current)
                if new is None:
                    pipe.reset()
                    return current
                new.version = int(pipe.incr(version_key))
                pipe.multi()
                pipe.set(key, new.to_json(), ex=SNAPSHOT_TTL)
                pipe.set(
                    meta_key(portal, user_id),
                    json.dumps({"version": new.version, "fetched_at": new.fetched_at}),
                    ex=SNAPSHOT_TTL,
                )
                pipe.expire(version_key, VERSION_TTL)
                pipe.execute()
                return new
            except WatchError:
                continue


def put(portal: Portal, user_id: int, snap: Snapshot, *, started: float) -> Snapshot:
    """Store a fetched list. Flows added by id after the fetch started stay in it."""

    def merge(current: Snapshot | None) -> Snapshot:
        if current is not None:
            listed = {row.flow_id for row in snap.flows}
            for row in current.flows:
                added_at = current.added.get(str(row.flow_id))
                if added_at is not None and added_at >= started and row.flow_id not in listed:
                    snap.flows.append(row)
                    snap.added[str(row.flow_id)] = added_at
        return snap

    stored = update(portal, user_id, merge)
    assert stored is not None
    redis_client().delete(_key("snapfail", portal, user_id))
    return stored


def add_row(portal: Portal, user_id: int, row: FlowRow) -> None:
    """A flow the user added by id joins their snapshot (when there is one, without it)."""

    def append(current: Snapshot | None) -> Snapshot | None:
        if current is None or any(f.flow_id == row.flow_id for f in current.flows):
            return None
        current.flows.append(row)
        current.added[str(row.flow_id)] = time.time()
        return current

    update(portal, user_id, append)


def remember_problem(portal: Portal | int, user_id: int, problem: str) -> None:
    """Why the last fetch of this user's list failed, for the page that waits on it."""
    redis_client().set(_key("snapfail", portal, user_id), problem, ex=SNAPSHOT_FRESH)


def problem(portal: Portal | int, user_id: int) -> str:
    raw = redis_client().get(_key("snapfail", portal, user_id))
    return raw.decode() if isinstance(raw, bytes) else ""


# --- refreshes in flight --------------------------------------------------------------------


def claim_refresh(portal_id: int, user_id: int) -> bool:
    """True when no refresh of this user's list is in flight (and now one is): a dozen tabs or
    a replayed frame POST cost the portal one list, not a dozen."""
    key = _key("refreshing", portal_id, user_id)
    return bool(redis_client().set(key, "1", nx=True, ex=REFRESH_TTL))


def release_refresh(portal_id: int, user_id: int) -> None:
    redis_client().delete(_key("refreshing", portal_id, user_id))


def refresh_or_read_in_flight(portal_id: int, user_id: int) -> bool:
    """A list refresh or a read of the pin states (`flows.pinread`) is on its way: one round
    trip for the open page's poll."""
    keys = (_key("refreshing", portal_id, user_id), _key("reading", portal_id, user_id))
    return bool(redis_client().exists(*keys))


def pending_refreshes() -> int:
    """List refreshes queued or running now (for tests and operators)."""
    return sum(1 for _ in redis_client().scan_iter(match="fp:refreshing:*", count=500))
