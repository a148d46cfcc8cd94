"""Portal REST methods: one module per namespace, every method registered here by name.

A new method: write ``handler(ctx, params)`` in its namespace's module (or a new module for a
new namespace) and add one :func:`register` line below, with the scopes that grant it.
:mod:`.registry` finds and runs methods, :mod:`.common` holds what handlers share.

Lookup mirrors the core's REST entry point: the name is tried lower-cased first (classic
methods are registered lower-case, so ``PROFILE`` works), then exactly as sent. The
``tasks.flow.Flow.*`` controller actions are registered only in camel case, so
``tasks.flow.flow.pin`` is ``ERROR_METHOD_NOT_FOUND`` while ``tasks.flow.Flow.pin`` works.

Parameter names: classic methods (placement.*, event.*, batch) upper-case their parameter
keys like the core's ``array_change_key_case``; the engine-controller methods
(``tasks.flow.Flow.*``, ``tasks.task.*``) bind parameters by exact name (``flowId``,
``taskId``, ``select``, ``filter``, ``order``, ``start``).

Error choices (taken from the core sources and the method pages of the docs):

* duplicate ``placement.bind`` -> 400 ``ERROR_CORE`` "Unable to set placement handler: Handler
  already binded"; duplicate ``event.bind`` -> 400 ``ERROR_CORE`` "Unable to set event
  handler: Handler already binded" (what the core throws; the docs' generic error table shows
  ``ERROR_HANDLER_ALREADY_EXIST`` instead).
* handler URLs must be http(s) with a dotted host (``ERROR_WRONG_HANDLER_URL`` /
  ``ERROR_UNSUPPORTED_PROTOCOL``), so ``http://localhost:8000/...`` is refused while
  ``http://127.0.0.1:8000/...`` is accepted (knob ``handler_url_check``).
* flow errors are ``{"error": "0", ...}`` with HTTP 400 (pin: knob ``pin_error_status``).
"""

from __future__ import annotations

from . import app, batch, event, placement, tasks_flow, tasks_task, user
from .common import CallContext, MethodResult
from .registry import REGISTRY, CallOutcome, execute_call, find_method, register, strip_suffix

__all__ = [
    "REGISTRY",
    "CallContext",
    "CallOutcome",
    "MethodResult",
    "execute_call",
    "find_method",
    "register",
    "strip_suffix",
]

_TASK = ("task",)
_PLACEMENT = ("placement",)

# basic scope (always granted)
register("profile", user.profile)
register("user.admin", user.user_admin)
register("user.current", user.user_current, scopes=("user", "user_brief", "user_basic"))
register("app.info", app.app_info)
register("scope", app.scope_list)

register("placement.list", placement.placement_list, scopes=_PLACEMENT)
register("placement.bind", placement.placement_bind, scopes=_PLACEMENT)
register("placement.unbind", placement.placement_unbind, scopes=_PLACEMENT)
register("placement.get", placement.placement_get, scopes=_PLACEMENT)

register("events", event.events_list)
register("event.bind", event.event_bind)
register("event.unbind", event.event_unbind)
register("event.get", event.event_get)

# controller actions: camel case only (tasks.flow.flow.pin is ERROR_METHOD_NOT_FOUND)
register("tasks.flow.Flow.get", tasks_flow.flow_get, scopes=_TASK, case_sensitive=True)
register("tasks.flow.Flow.pin", tasks_flow.flow_pin, scopes=_TASK, case_sensitive=True)
register("tasks.flow.Flow.list", tasks_flow.flow_list, scopes=_TASK, case_sensitive=True)

register("tasks.task.list", tasks_task.task_list, scopes=_TASK)
register("tasks.task.get", tasks_task.task_get, scopes=_TASK)

# a batch is one request: its commands count operating time, it does not
register("batch", batch.batch, operating=False)
