"""Portal lifecycle work that must not run inside an event request.

Each task loads the portal by id and calls a service. Why the retry policy is safe: binding is
idempotent (unbind, then bind, in one batch), so a retry after a rate limit or outage can only
converge; permanent failures (dead tokens, uninstalled portal) are recorded and not retried.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import bootsteps, shared_task
from django.db import transaction

from b24app import calllog, lifecycle, tokens
from b24app.bitrix.errors import RateLimited, ReinstallRequired, ReopenRequired, TransientError
from b24app.celery import app
from b24app.models import Portal
from b24app.redisconn import redis_client

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 3600


# Events that ask for a re-binding within this many seconds share one (a burst of updates, or
# a replayed event, costs the portal one batch).
REBIND_COALESCE_SECONDS = 5


def _rebind_key(portal_id: int) -> str:
    return f"fp:rebind:{portal_id}"


def request_rebind(portal_id: int) -> bool:
    """Bind the handlers again soon (after commit), unless a re-binding is already queued."""
    if not redis_client().set(_rebind_key(portal_id), "1", nx=True, ex=6 * REBIND_COALESCE_SECONDS):
        return False
    transaction.on_commit(
        lambda: bind_handlers.apply_async(
            kwargs={"portal_id": portal_id}, countdown=REBIND_COALESCE_SECONDS
        )
    )
    return True


@shared_task(name="b24app.bind_handlers", bind=True, max_retries=8, acks_late=True)
def bind_handlers(self, *, portal_id: int) -> str:  # type: ignore[no-untyped-def]
    if not self.request.retries:
        redis_client().delete(_rebind_key(portal_id))  # an event from now on queues another
    portal = Portal.objects.filter(pk=portal_id).first()
    if portal is None or not portal.is_active:
        return "skipped: portal gone or not active"
    try:
        lifecycle.portal_bind_handlers(portal)
    except TransientError as exc:
        delay = exc.retry_after if isinstance(exc, RateLimited) else 2**self.request.retries
        raise self.retry(countdown=min(300, delay + random.uniform(0, 1 + delay))) from None
    except (ReopenRequired, ReinstallRequired) as exc:
        log.warning("portal %s: cannot bind handlers: %s", portal.member_id, exc)
        return f"failed: {exc}"
    return "bound"


@shared_task(name="b24app.confirm_uninstall", bind=True, max_retries=10, acks_late=True)
def confirm_uninstall(self, *, portal_id: int, clean: bool) -> str:  # type: ignore[no-untyped-def]
    """An ONAPPUNINSTALL that arrived while Bitrix24 could not be asked: ask again, with backoff
    (Bitrix24 never resends an event). Safe to repeat: the verdict only reads, and uninstalling
    twice deletes nothing more."""
    portal = Portal.objects.filter(pk=portal_id).first()
    if portal is None or portal.state == Portal.State.UNINSTALLED:
        return "skipped: portal gone or already uninstalled"
    verdict = lifecycle.uninstall_verdict(portal)
    if verdict is lifecycle.UninstallVerdict.CONFIRMED:
        lifecycle.portal_uninstall(portal, clean=clean)
        return "uninstalled"
    if verdict is lifecycle.UninstallVerdict.DENIED:
        log.warning("portal %s: ONAPPUNINSTALL not confirmed by Bitrix24", portal.member_id)
        return "denied"
    if self.request.retries >= self.max_retries:
        log.error("portal %s: could not confirm ONAPPUNINSTALL with Bitrix24", portal.member_id)
        return "unconfirmed"
    delay = min(600, 15 * 2**self.request.retries)
    raise self.retry(countdown=delay + random.uniform(0, delay / 4))


@shared_task(name="b24app.prune_call_log", acks_late=True)
def prune_call_log() -> int:
    return calllog.prune_call_log()


@shared_task(name="b24app.keep_tokens_alive", acks_late=True)
def keep_tokens_alive() -> int:
    """Refresh chains idle for months: a refresh token dies after 180 days unused. Safe to run
    on several workers at once: each refresh is the locked, double-checked one."""
    return tokens.keep_idle_tokens_alive()


class Maintenance(bootsteps.StartStopStep):  # type: ignore[misc]
    """Hourly housekeeping on every worker (duplicates are harmless): drop REST call metadata
    past its retention, and keep idle users' refresh chains alive."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, parent: Any) -> None:
        self.timer = parent.timer.call_repeatedly(MAINTENANCE_SECONDS, run_maintenance)

    def stop(self, parent: Any) -> None:
        timer = getattr(self, "timer", None)
        if timer is not None:
            timer.cancel()


def run_maintenance() -> None:
    try:
        prune_call_log.delay()
        keep_tokens_alive.delay()
    except Exception:
        log.warning("could not queue maintenance", exc_info=True)


app.steps["consumer"].add(Maintenance)
