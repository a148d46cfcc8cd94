"""Celery tasks for pins and flow lists: retry and delegate, nothing else.

Ids only in the broker (never tokens). Why the retry policy is safe: `converge_user` reads the
intents and the last recorded answers afresh on every run and only toggles what still differs, so
a redelivered task (acks_late), a retry after a lost answer or a duplicate enqueue cannot leave a
wrong state; rate limits and outages retry with jittered backoff, permanent failures are recorded
on the intents and not retried.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import bootsteps, shared_task
from celery.signals import worker_ready
from django.db import DatabaseError
from redis.exceptions import RedisError

from b24app.bitrix.errors import BitrixError, TransientError
from b24app.celery import app
from b24app.models import Portal, PortalUser
from b24app.redisconn import redis_client
from b24app.tokens import ReinstallRequired, ReopenRequired
from flows import services
from flows.models import PinIntent

log = logging.getLogger(__name__)

QUEUED_TTL = 60
SWEEP_SECONDS = 60
# A run starts this long after the click that queued it, so a burst of clicks (pin, unpin,
# pin; or a user going down the list) is sent as one batch. Well under a human's patience.
COALESCE_SECONDS = 0.0


def _queued_key(portal_id: int, user_id: int) -> str:
    return f"fp:queued:{portal_id}:{user_id}"


def _failures_key(portal_id: int, user_id: int, kind: str = "failures") -> str:
    """This user's failed runs in a row: the exponent of the backoff. Outages and unexpected
    errors count apart (`kind`), so a few outages do not use up the unexpected-error budget."""
    return f"fp:{kind}:{portal_id}:{user_id}"


def enqueue_converge(portal_id: int, user_id: int, *, delay: float = COALESCE_SECONDS) -> None:
    """Start a convergence run for the user unless one is already queued or running.

    One run per user is in flight at a time: it reads the latest intents every round, so rapid
    clicks coalesce into it instead of each starting a task of its own, and its backoff after
    an outage holds for every click. A click that lands after the run's last look is caught when
    the run ends (`_run_finished`).
    """
    if redis_client().set(_queued_key(portal_id, user_id), "1", nx=True, ex=QUEUED_TTL):
        try:
            converge.apply_async(
                kwargs={"portal_id": portal_id, "user_id": user_id}, countdown=delay or None
            )
        except Exception:
            redis_client().delete(_queued_key(portal_id, user_id))
            raise


def _count_failure(portal_id: int, user_id: int, kind: str = "failures") -> int:
    """This user's failed runs in a row, this one included (reset by a run that succeeds)."""
    key = _failures_key(portal_id, user_id, kind)
    try:
        failures = int(redis_client().incr(key))
        redis_client().expire(key, 3600)
    except RedisError:
        failures = 4
    return failures


def _backoff(failures: int, at_least: float = 0.0) -> float:
    """Jittered exponential backoff in the number of failures, capped at a minute."""
    backoff = max(at_least, min(60.0, 0.5 * 2.0 ** min(failures - 1, 7)))
    return float(backoff + random.uniform(0, backoff / 2))


def _outage_backoff(portal_id: int, user_id: int, at_least: float) -> float:
    """Backoff counted per user (not per task): every click of that user shares it."""
    return _backoff(_count_failure(portal_id, user_id), at_least)


def _run_finished(portal_id: int, user_id: int) -> None:
    redis_client().delete(_queued_key(portal_id, user_id))
    # A click that committed while this run was finishing saw it "in flight" and queued nothing:
    # look once more, now that the marker is gone.
    if services.has_pending(portal_id, user_id):
        enqueue_converge(portal_id, user_id)


@shared_task(name="flows.converge", bind=True, max_retries=None, acks_late=True)
def converge(self: Any, *, portal_id: int, user_id: int) -> dict[str, int] | str:
    queued = _queued_key(portal_id, user_id)
    redis_client().expire(queued, QUEUED_TTL)  # still in flight
    try:
        result = services.converge_user(
            portal_id,
            user_id,
            holder=self.request.hostname or "",
            keep_alive=((queued, QUEUED_TTL),),  # the marker lives as long as the run
        )
    except services.LockLost:
        # Our lock lapsed mid-run (Redis lost it, or the process stalled): whoever holds it now
        # carries on; if nobody does, the marker's TTL and the sweep start a fresh run.
        log.warning("convergence for a user of portal %s lost its lock; stopped", portal_id)
        return "stopped: lock lost"
    except services.Busy:
        # A duplicate run (after a restart or a sweep) holds the lock; come back shortly.
        raise self.retry(countdown=random.uniform(0.2, 0.6)) from None
    except (DatabaseError, RedisError) as exc:
        # Our own infrastructure blinked (a failover, a restart): the intents are safe in the
        # database, so back off and try again like any outage.
        log.warning("convergence for a user of portal %s paused: %s", portal_id, type(exc).__name__)
        raise self.retry(countdown=_outage_backoff(portal_id, user_id, 1.0)) from None
    except services.RetryLater as exc:
        if exc.delay < 0:
            _run_finished(portal_id, user_id)
            return f"stopped: {exc}"
        if exc.progress:  # the portal answered this run: the outage before it is over
            redis_client().delete(_failures_key(portal_id, user_id))
        if exc.exact:
            # The bucket has room, or a quiet period ends, exactly then: come back then (plus a
            # hair, so the waiting users of one portal do not all arrive at the same instant).
            countdown = max(0.0, exc.delay) + random.uniform(0, 0.05)
        else:  # an outage, or answers lost again and again
            countdown = _outage_backoff(portal_id, user_id, exc.delay)
        redis_client().expire(_queued_key(portal_id, user_id), QUEUED_TTL + int(countdown) + 1)
        raise self.retry(countdown=countdown) from None
    except Exception:
        return _unexpected_failure(self, portal_id, user_id)
    redis_client().delete(
        _failures_key(portal_id, user_id), _failures_key(portal_id, user_id, UNEXPECTED)
    )
    _run_finished(portal_id, user_id)
    return result


# After this many unexpected failures in a row (a bug, an undecryptable token, an answer we
# cannot read) a user's pending pins are marked failed instead of retried for ever.
MAX_UNEXPECTED_FAILURES = 5
UNEXPECTED = "unexpected"  # the counter those failures keep (apart from outages)


def _unexpected_failure(task: Any, portal_id: int, user_id: int) -> str:
    """Back off like an outage — never re-run at once — and give up after a few in a row."""
    log.exception("convergence for a user of portal %s failed unexpectedly", portal_id)
    failures = _count_failure(portal_id, user_id, UNEXPECTED)
    if failures < MAX_UNEXPECTED_FAILURES:
        countdown = _backoff(failures, 1.0)
        redis_client().expire(_queued_key(portal_id, user_id), QUEUED_TTL + int(countdown) + 1)
        raise task.retry(countdown=countdown) from None
    failed = services.fail_pending(portal_id, user_id, PinIntent.Problem.INTERNAL)
    redis_client().delete(_failures_key(portal_id, user_id, UNEXPECTED))
    _run_finished(portal_id, user_id)
    return f"gave up after {failures} unexpected failures ({failed} pins marked failed)"


REFRESH_TTL = 120  # seconds a snapshot refresh may be in flight before another may start
REFRESH_SKIP_SECONDS = 5  # a refresh that finds a snapshot this young has nothing to add


def _refreshing_key(portal_id: int, user_id: int) -> str:
    return f"fp:refreshing:{portal_id}:{user_id}"


def pending_refreshes() -> int:
    """List refreshes queued or running now (for tests and operators)."""
    return sum(1 for _ in redis_client().scan_iter(match="fp:refreshing:*", count=500))


def refresh_in_flight(portal_id: int, user_id: int) -> bool:
    return bool(redis_client().exists(_refreshing_key(portal_id, user_id)))


def request_snapshot_refresh(portal_id: int, user_id: int, *, interactive: bool = False) -> bool:
    """Queue a refresh of the user's flow list unless one is already in flight (a dozen tabs
    or a replayed frame POST cost the portal one list, not a dozen). True when queued."""
    key = _refreshing_key(portal_id, user_id)
    if not redis_client().set(key, "1", nx=True, ex=REFRESH_TTL):
        return False
    try:
        refresh_snapshot.delay(portal_id=portal_id, user_id=user_id, interactive=interactive)
    except Exception:
        redis_client().delete(key)
        raise
    return True


@shared_task(name="flows.refresh_snapshot", acks_late=True, ignore_result=True)
def refresh_snapshot(
    *, portal_id: int, user_id: int, interactive: bool = False, force: bool = False
) -> str:
    """Why it is safe to run twice: it only reads the portal and overwrites the snapshot.
    `force`: fetch even when a refresh just landed (an operator's or a benchmark's ask)."""
    try:
        portal = Portal.objects.filter(pk=portal_id, state=Portal.State.ACTIVE).first()
        user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
        if portal is None or user is None:
            return "skipped"
        current = services.snapshot_get(portal, user_id)
        if current is not None and current.age < REFRESH_SKIP_SECONDS and not force:
            return "skipped: another refresh just landed"
        try:
            snap = services.flows_fetch(portal, user, bulk=not interactive)
        except Exception as exc:  # a background refresh: the page keeps what it has
            problem = services.snapshot_failed(portal, user_id, exc)
            log.info("snapshot refresh for portal %s failed: %s", portal.member_id, problem)
            return "failed"
        return f"{len(snap.flows)} flows"
    finally:
        redis_client().delete(_refreshing_key(portal_id, user_id))


@worker_ready.connect
def release_stale_locks(sender: Any = None, **_: Any) -> None:
    """A node that starts has run nothing yet: any lock in its name was left by a killed
    predecessor, and would stall that user's pins until the lock's TTL ran out."""
    hostname = str(getattr(sender, "hostname", "") or "")
    try:
        released = services.release_locks_of(hostname)
    except Exception:
        log.warning("could not release stale convergence locks", exc_info=True)
        return
    if released:
        log.warning("released %d convergence lock(s) left by a killed %s", released, hostname)


class ResumeOnConnect(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs each time the worker's consumer (re)connects to the broker: at start, after a crash,
    and after a broker outage — which may have lost queued messages, and during which the web
    saved clicks it could not queue, promising they would be applied once the broker is back."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, parent: Any) -> None:
        resume_pending_work()
        # And every minute: a run whose worker died (its message comes back only after the
        # broker's visibility timeout) must not leave a user's pins waiting that long.
        self.sweeper = parent.timer.call_repeatedly(SWEEP_SECONDS, sweep_pending_work)
        self.pruner = parent.timer.call_repeatedly(PRUNE_SECONDS, queue_prune)

    def stop(self, parent: Any) -> None:
        for timer in (getattr(self, "sweeper", None), getattr(self, "pruner", None)):
            if timer is not None:
                timer.cancel()


app.steps["consumer"].add(ResumeOnConnect)


@shared_task(
    name="flows.add_flow",
    bind=True,
    max_retries=5,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(TransientError,),
    retry_backoff=2,
    retry_backoff_max=60,
)
def add_flow(self: Any, *, portal_id: int, user_id: int, flow_id: int) -> str:
    """An add the web could not finish within its deadline. Safe to repeat: it reads the flow
    and upserts it; transient failures retry with capped, jittered backoff."""
    portal = Portal.objects.filter(pk=portal_id, state=Portal.State.ACTIVE).first()
    user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
    if portal is None or user is None:
        return "skipped"
    try:
        info = services.flow_add_by_id(portal, user, flow_id)
    except (BitrixError, ReopenRequired, ReinstallRequired) as exc:
        if isinstance(exc, TransientError):
            raise
        return f"not added: {type(exc).__name__}"
    return f"added {info.flow_id}"


PRUNE_SECONDS = 3600


@shared_task(name="flows.prune_intents", acks_late=True, ignore_result=True)
def prune_intents() -> int:
    """Settled intents past their retention go; safe on several workers at once (a DELETE)."""
    return services.prune_settled_intents()


def queue_prune() -> None:
    try:
        prune_intents.delay()
    except Exception:
        log.warning("could not queue the intent pruning", exc_info=True)


def sweep_pending_work() -> None:
    """Start a run for every user with pending intents and no run in flight."""
    try:
        for portal_id, user_id in services.pending_users():
            enqueue_converge(portal_id, user_id)
    except Exception:
        log.warning("could not sweep pending pin work", exc_info=True)


def resume_pending_work() -> None:
    """Queue a convergence run for every user with a pending intent (coalesced per user)."""
    try:
        for portal_id, user_id in services.pending_users():
            redis_client().delete(_queued_key(portal_id, user_id))
            enqueue_converge(portal_id, user_id)
    except Exception:
        log.warning("could not resume pending pin work", exc_info=True)
