"""The Celery application. Workers run `celery -A b24app worker`."""

import logging
import os
from typing import Any

from celery import Celery, signals
from kombu.transport import redis as kombu_redis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")

app = Celery("flowpins")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

_log = logging.getLogger(__name__)
_restore_unacked_once = kombu_redis.QoS.restore_unacked_once


def _restore_unacked_once_or_leave_them(self: Any, stderr: Any = None) -> Any:
    """When the broker dies, kombu's Redis transport tries to push the worker's unacknowledged
    messages back through the connection that just died, and the AttributeError it meets there
    stops the whole worker ("Unrecoverable error"). Nothing is lost by not restoring them here:
    they stay in the broker's unacked set and come back after the visibility timeout, and the
    worker re-queues every pending intent when it reconnects (flows.tasks.ResumeOnConnect)."""
    try:
        return _restore_unacked_once(self, stderr)  # type: ignore[no-untyped-call]
    except Exception:
        _log.warning("could not requeue unacknowledged messages: the broker connection is gone")
        return None


kombu_redis.QoS.restore_unacked_once = _restore_unacked_once_or_leave_them  # type: ignore[method-assign]


def _refuse_unreadable_tokens(**kwargs: Any) -> None:
    """A worker whose B24_TOKEN_KEY cannot read the stored tokens would fail every task: stop it
    before it takes any. Celery logs and swallows exceptions raised by signal handlers, so this
    exits (SystemExit is not an Exception); Django is set up by then (Celery's Django fix-up runs
    its worker_init handler first)."""
    from django.core.exceptions import ImproperlyConfigured

    from b24app.checks import refuse_unreadable_tokens

    try:
        refuse_unreadable_tokens()
    except ImproperlyConfigured as exc:
        _log.critical("%s", exc)
        raise SystemExit(f"Flow Pins worker not started: {exc}") from None


def _filter_worker_log_handlers(logger: logging.Logger, **kwargs: Any) -> None:
    """Celery replaces the root logger's handlers with its own when a worker starts, and Django's
    redacting filter (settings.LOGGING) goes with them: put it on Celery's handlers too, so a
    worker's log lines are masked and escaped like the web server's."""
    from b24app.logging import RedactSecretsFilter

    for handler in logger.handlers:
        if not any(isinstance(f, RedactSecretsFilter) for f in handler.filters):
            handler.addFilter(RedactSecretsFilter())


def _yield_cpu_to_the_web(**kwargs: Any) -> None:
    """Where web and workers share cores, give the web the CPU first (FLOWPINS_WORKER_NICE):
    a click's answer is what a person waits for. It does not reach the work a run causes in
    PostgreSQL, Redis or the portal; see the README's "What a click costs"."""
    from django.conf import settings

    if settings.FLOWPINS_WORKER_NICE > 0:
        os.nice(settings.FLOWPINS_WORKER_NICE)


signals.worker_init.connect(_refuse_unreadable_tokens)
signals.worker_init.connect(_yield_cpu_to_the_web)
signals.after_setup_logger.connect(_filter_worker_log_handlers)
signals.after_setup_task_logger.connect(_filter_worker_log_handlers)
