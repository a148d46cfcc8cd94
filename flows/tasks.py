"""Celery tasks for pins and flow lists: each carries out what its service decides, nothing else.

Ids only in the broker (never tokens). Why the retry policy is safe: a convergence run
(`flows.converge`) reads the intents and the last recorded answers afresh every time and only
toggles what still differs, so a redelivered task (acks_late), a retry after a lost answer or a
duplicate enqueue cannot leave a wrong state. The run decides every delay; the task only turns
its Outcome into a Celery retry.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, shared_task
from celery.signals import worker_ready

from b24app.bitrix.errors import BitrixError, TransientError
from b24app.celery import app
from b24app.models import Portal, PortalUser
from b24app.queues import BULK_QUEUE
from flows import converge as engine
from flows import intents, listing, pinread, snapshots
from flows.lock import release_locks_of
from flows.outcome import Kind

log = logging.getLogger(__name__)

SWEEP_SECONDS = 60


def enqueue_converge(portal_id: int, user_id: int, *, bulk: bool = False) -> None:
    """Start a convergence run for the user unless one is already queued or running.

    One run per user is in flight at a time: it reads the latest intents every round, so rapid
    clicks coalesce into it instead of each starting a task of its own, and its backoff after
    an outage holds for every click. A click that lands after the run's last look is caught when
    the run ends (`run_finished`). `bulk`: many toggles (a Pin all, a read of every pin): the
    run waits on BULK_QUEUE until no click does, and its retries stay there.
    """
    if engine.claim_queued(portal_id, user_id):
        try:
            converge.apply_async(
                kwargs={"portal_id": portal_id, "user_id": user_id},
                queue=BULK_QUEUE if bulk else None,  # None: the route in the settings
            )
        except Exception:
            engine.release_queued(portal_id, user_id)
            raise


def run_finished(portal_id: int, user_id: int) -> None:
    """A run ended: queue another if pins are pending still."""
    if engine.finish_run(portal_id, user_id):
        enqueue_converge(portal_id, user_id)


@shared_task(name="flows.converge", bind=True, max_retries=None, acks_late=True)
def converge(self: Any, *, portal_id: int, user_id: int) -> str:
    outcome = engine.run(portal_id, user_id, holder=self.request.hostname or "")
    if outcome.kind is Kind.RETRY:
        raise self.retry(countdown=outcome.delay)
    if outcome.again:
        enqueue_converge(portal_id, user_id, bulk=_on_bulk_queue(self))
    return str(outcome)


def _on_bulk_queue(task: Any) -> bool:
    delivery = getattr(task.request, "delivery_info", None) or {}
    return bool(delivery.get("routing_key") == BULK_QUEUE)


def request_snapshot_refresh(portal_id: int, user_id: int, *, interactive: bool = False) -> bool:
    """Queue a refresh of the user's flow list unless one is already in flight. True when
    queued."""
    if not snapshots.claim_refresh(portal_id, user_id):
        return False
    try:
        refresh_snapshot.delay(portal_id=portal_id, user_id=user_id, interactive=interactive)
    except Exception:
        snapshots.release_refresh(portal_id, user_id)
        raise
    return True


@shared_task(name="flows.refresh_snapshot", acks_late=True, ignore_result=True)
def refresh_snapshot(
    *, portal_id: int, user_id: int, interactive: bool = False, force: bool = False
) -> str:
    done = listing.refresh(portal_id, user_id, interactive=interactive, force=force)
    if done.endswith(" flows") and pinread.in_flight(portal_id, user_id):
        enqueue_converge(portal_id, user_id, bulk=True)  # a read waits for this list: start it
    return done


@worker_ready.connect
def release_stale_locks(sender: Any = None, **_: Any) -> None:
    """A node that starts has run nothing yet: any lock in its name was left by a killed
    predecessor, and would stall that user's pins until the lock's TTL ran out."""
    hostname = str(getattr(sender, "hostname", "") or "")
    try:
        released = release_locks_of(hostname)
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
        info = listing.add_by_id(portal, user, flow_id)
    except BitrixError as exc:
        if isinstance(exc, TransientError):
            raise
        return f"not added: {type(exc).__name__}"
    return f"added {info.flow_id}"


PRUNE_SECONDS = 3600


@shared_task(name="flows.prune_intents", acks_late=True, ignore_result=True)
def prune_intents() -> int:
    """Settled intents past their retention go; safe on several workers at once (a DELETE)."""
    return intents.prune_settled()


def queue_prune() -> None:
    try:
        prune_intents.delay()
    except Exception:
        log.warning("could not queue the intent pruning", exc_info=True)


def sweep_pending_work() -> None:
    """Start a run for every user with pending intents and no run in flight."""
    try:
        for portal_id, user_id in intents.pending_users() + pinread.wanted_users():
            enqueue_converge(portal_id, user_id)
    except Exception:
        log.warning("could not sweep pending pin work", exc_info=True)


def resume_pending_work() -> None:
    """Queue a convergence run for every user with a pending intent (coalesced per user)."""
    try:
        for portal_id, user_id in intents.pending_users() + pinread.wanted_users():
            engine.release_queued(portal_id, user_id)
            enqueue_converge(portal_id, user_id)
    except Exception:
        log.warning("could not resume pending pin work", exc_info=True)
