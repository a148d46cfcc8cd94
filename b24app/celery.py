"""The Celery application. Workers run `celery -A b24app worker`."""

import logging
import os
from typing import Any

from celery import Celery
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
