"""The admin's view's work that asks the portal, in a worker (no web request waits on it):
whether a user is an administrator, which handlers are bound, and a re-binding on request.

Ids only in the broker. Why the retry policy is safe: both tasks only read the portal and
keep its latest answer, so a retry or a redelivery (acks_late) asks again and overwrites it;
only transient errors (rate limit, outage) are retried, with jittered, capped backoff.
"""

from __future__ import annotations

import random
from typing import Any

from celery import chain, shared_task

from b24app import status
from b24app.bitrix.errors import RateLimited, TransientError
from b24app.redisconn import redis_client
from b24app.tasks import bind_handlers

# A request for the same check or read within this many seconds is the one already queued.
QUEUED_SECONDS = 60


def _queued_once(key: str) -> bool:
    return bool(redis_client().set(key, b"1", nx=True, ex=QUEUED_SECONDS))


def _check_key(portal_id: int, user_id: int) -> str:
    return f"fp:admin_check_queued:{portal_id}:{user_id}"


def _read_key(portal_id: int) -> str:
    return f"fp:admin_read_queued:{portal_id}"


def request_admin_check(portal_id: int, user_id: int) -> None:
    """Ask the portal whether this user is an administrator, unless that is asked already."""
    key = _check_key(portal_id, user_id)
    if _queued_once(key):
        try:
            admin_check.delay(portal_id=portal_id, user_id=user_id)
        except Exception:
            redis_client().delete(key)
            raise


def request_bindings_read(portal_id: int, user_id: int) -> None:
    """Read the app's bindings from the portal with this admin's token, unless queued already."""
    key = _read_key(portal_id)
    if _queued_once(key):
        try:
            admin_bindings.delay(portal_id=portal_id, user_id=user_id)
        except Exception:
            redis_client().delete(key)
            raise


def request_rebind(portal_id: int, user_id: int, rebind_at: float) -> None:
    """Bind the handlers again (the install's own task), then read what the portal reports:
    the read that answers the re-binding clicked at `rebind_at`."""
    redis_client().set(_read_key(portal_id), b"1", ex=QUEUED_SECONDS)
    chain(
        bind_handlers.si(portal_id=portal_id),
        admin_bindings.si(portal_id=portal_id, user_id=user_id, rebind_at=rebind_at),
    ).apply_async()


def _backoff(exc: TransientError, retries: int) -> float:
    delay = exc.retry_after if isinstance(exc, RateLimited) else 2**retries
    return float(min(120, delay + random.uniform(0, 1 + delay)))


def _retry_later(task: Any, key: str, exc: TransientError) -> Exception:
    """The retry of a check or read, its queued marker kept until it runs: the page's polls
    queue no second copy while this one waits out the portal's limit or outage."""
    countdown = _backoff(exc, task.request.retries)
    redis_client().set(key, b"1", ex=int(countdown) + QUEUED_SECONDS)
    return task.retry(countdown=countdown)  # type: ignore[no-any-return]


@shared_task(name="flows.admin_check", bind=True, max_retries=5, acks_late=True)  # type: ignore[untyped-decorator]
def admin_check(self: Any, *, portal_id: int, user_id: int) -> str:
    try:
        answer = status.learn_admin(portal_id, user_id)
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            redis_client().delete(_check_key(portal_id, user_id))
            return "unanswered"
        raise _retry_later(self, _check_key(portal_id, user_id), exc) from None
    redis_client().delete(_check_key(portal_id, user_id))
    return {True: "admin", False: "not admin", None: "tokens unusable"}[answer]


@shared_task(name="flows.admin_bindings", bind=True, max_retries=5, acks_late=True)  # type: ignore[untyped-decorator]
def admin_bindings(
    self: Any, *, portal_id: int, user_id: int, rebind_at: float | None = None
) -> str:
    try:
        bindings = status.read_bindings(portal_id, user_id, rebind_at)
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            redis_client().delete(_read_key(portal_id))
            return "unanswered"
        raise _retry_later(self, _read_key(portal_id), exc) from None
    redis_client().delete(_read_key(portal_id))
    if bindings is None:
        return "no such user"
    return f"read: {len(bindings.found)} bound, {len(bindings.missing())} missing"
