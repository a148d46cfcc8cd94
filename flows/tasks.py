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

from celery import shared_task
from celery.signals import worker_ready

from b24app.bitrix.ratelimit import redis_client
from b24app.models import Portal, PortalUser
from flows import services

log = logging.getLogger(__name__)

QUEUED_TTL = 60


def _queued_key(portal_id: int, user_id: int) -> str:
    return f"fp:queued:{portal_id}:{user_id}"


def enqueue_converge(portal_id: int, user_id: int) -> None:
    """Enqueue one convergence run for the user unless one is already waiting to start.

    Rapid clicks coalesce: the waiting run will read the latest intents when it starts.
    """
    if redis_client().set(_queued_key(portal_id, user_id), "1", nx=True, ex=QUEUED_TTL):
        try:
            converge.apply_async(kwargs={"portal_id": portal_id, "user_id": user_id})
        except Exception:
            redis_client().delete(_queued_key(portal_id, user_id))
            raise


@shared_task(name="flows.converge", bind=True, max_retries=None, acks_late=True)
def converge(self: Any, *, portal_id: int, user_id: int) -> dict[str, int] | str:
    redis_client().delete(_queued_key(portal_id, user_id))
    try:
        return services.converge_user(portal_id, user_id)
    except services.Busy:
        # Another run holds this user's lock; come back shortly and pick up what it left.
        raise self.retry(countdown=random.uniform(0.2, 0.6), max_retries=None) from None
    except services.RetryLater as exc:
        if exc.delay < 0:
            return f"stopped: {exc}"
        attempt = min(self.request.retries, 8)
        backoff = (
            max(exc.delay, min(60.0, 0.5 * 2**attempt)) if "rate" not in str(exc) else exc.delay
        )
        raise self.retry(countdown=backoff + random.uniform(0, 0.3 + backoff / 4)) from None


@shared_task(name="flows.refresh_snapshot", acks_late=True, ignore_result=True)
def refresh_snapshot(*, portal_id: int, user_id: int) -> str:
    portal = Portal.objects.filter(pk=portal_id, state=Portal.State.ACTIVE).first()
    user = PortalUser.objects.filter(portal_id=portal_id, user_id=user_id).first()
    if portal is None or user is None:
        return "skipped"
    try:
        snap = services.flows_fetch(portal, user)
    except Exception as exc:  # a background refresh: the page keeps the old snapshot
        log.info("snapshot refresh for portal %s failed: %s", portal.member_id, type(exc).__name__)
        return "failed"
    return f"{len(snap.flows)} flows"


@worker_ready.connect
def resume_pending_work(**_: Any) -> None:
    """After a restart (or a crash), pick up every intent that is still pending."""
    try:
        for portal_id, user_id in services.pending_users():
            redis_client().delete(_queued_key(portal_id, user_id))
            enqueue_converge(portal_id, user_id)
    except Exception:
        log.warning("could not resume pending pin work", exc_info=True)
