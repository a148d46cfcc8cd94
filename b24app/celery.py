"""The Celery application. Workers run `celery -A b24app worker`."""

import logging
import logging.config
import os
import sys
from typing import Any

from celery import Celery, signals
from kombu.transport import redis as kombu_redis

from b24app import logcontext

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
    worker's log lines are masked and escaped like the web server's. With LOG_FORMAT=json they
    are JSON lines too, with the task's context (b24app.logcontext)."""
    from django.conf import settings

    from b24app.logcontext import JsonFormatter
    from b24app.logging import RedactSecretsFilter

    for handler in logger.handlers:
        if not any(isinstance(f, RedactSecretsFilter) for f in handler.filters):
            handler.addFilter(RedactSecretsFilter())
        if settings.LOG_FORMAT == "json":
            handler.setFormatter(JsonFormatter())


def _json_from_the_start(**kwargs: Any) -> None:
    """LOG_FORMAT=json: what the worker says before Celery sets up its logging (a warning such
    as "running as root") is a JSON line too, not Python's plain warning text."""
    from django.conf import settings

    if settings.LOG_FORMAT == "json":
        logging.config.dictConfig(settings.LOGGING)
        logging.captureWarnings(True)


def _json_worker_output(instance: Any = None, **kwargs: Any) -> None:
    """LOG_FORMAT=json: the worker's start-up banner and its shutdown notices are printed, not
    logged; they would be the only lines that are not JSON. No banner (Celery prints it after
    this signal, unless quiet), and the notices as JSON lines."""
    from celery.apps import worker as celery_worker
    from django.conf import settings

    from b24app.logcontext import JsonFormatter

    if settings.LOG_FORMAT != "json" or instance is None:
        return
    instance.quiet = True
    formatter = JsonFormatter()

    def say(msg: str, f: Any = None) -> None:
        record = logging.LogRecord(
            "celery.apps.worker", logging.WARNING, __file__, 0, msg.strip(), None, None
        )
        print(formatter.format(record), file=f or sys.__stderr__, flush=True)

    celery_worker.safe_say = say


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
signals.celeryd_init.connect(_json_from_the_start)
signals.celeryd_after_setup.connect(_json_worker_output)
# Correlated logs: the request's (or task's) request id, member_id and user id travel with every
# task it queues, in the message headers, and the task's log lines carry them.
signals.before_task_publish.connect(logcontext.add_context_to_message)
signals.task_prerun.connect(logcontext.enter_task)
signals.task_postrun.connect(logcontext.leave_task)
