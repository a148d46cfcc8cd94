"""Correlated logs: who a log line is about, carried from a web request into the tasks it queues.

Every web request gets a request id (an incoming `X-Request-ID` when it is a sane short token,
else a new one), returned in the response's `X-Request-ID`. Once the frame, the event or the
page token is verified, the portal's `member_id` and the user id join it (never a token or the
domain). A task queued meanwhile carries these in its message headers, and the worker's lines
for that task carry them too, with the task id. `LOG_FORMAT=json` writes one JSON object per
line with these fields; the default text format is unchanged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, HttpResponse

from b24app.logging import redact

FIELDS = ("request_id", "member_id", "user_id", "task_id")
REQUEST_ID_HEADER = "X-Request-ID"
# The keys in a task message's headers (Celery keeps custom headers on `task.request`).
MESSAGE_HEADERS = {key: f"flowpins_{key}" for key in ("request_id", "member_id", "user_id")}

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")  # fullmatch: "$" would let a final "\n" in
_MEMBER = re.compile(r"[A-Za-z0-9_-]{1,64}")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "flowpins_log_context", default=None
)
_request: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar(
    "flowpins_request", default=None
)


def current() -> dict[str, Any]:
    """The fields known in this request or task (a copy)."""
    return dict(_context.get() or {})


def current_request() -> HttpRequest | None:
    """The web request being served in this context, if any (for the error reports' scrubber)."""
    return _request.get()


def _sane(key: str, value: Any) -> Any:
    """A value fit for a log field, or None: ids only, so nothing from a request can forge a
    line or carry a secret into the logs."""
    if key == "user_id":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        digits = isinstance(value, str) and value.isascii() and value.isdigit()
        return int(value) if digits and len(value) <= 12 else None
    if key == "member_id":
        return value if isinstance(value, str) and _MEMBER.fullmatch(value) else None
    return value if isinstance(value, str) and _SANE_ID.fullmatch(value) else None


def bind(**values: Any) -> None:
    """Add fields to this request's or task's context (after their verification)."""
    fresh = {k: v for k, v in ((k, _sane(k, v)) for k, v in values.items()) if v is not None}
    if fresh:
        _context.set({**(_context.get() or {}), **fresh})


def new_request_id(incoming: str = "") -> str:
    """The client's (or proxy's) id when it is a short token of letters, digits, `._-`;
    otherwise a new random one."""
    return incoming if _SANE_ID.fullmatch(incoming) else str(uuid.uuid4())


class RequestContextMiddleware:
    """First in MIDDLEWARE: a request id for every request, in the context while it is served
    and in the answer's X-Request-ID header."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER, ""))
        context_token = _context.set({"request_id": request_id})
        request_token = _request.set(request)
        try:
            response = self.get_response(request)
        finally:
            _request.reset(request_token)
            _context.reset(context_token)
        response[REQUEST_ID_HEADER] = request_id
        return response


# -- Celery: from the publisher's context into the message, from the message into the task's ------


def add_context_to_message(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """`before_task_publish`: the request's (or the running task's) fields go with the task."""
    context = _context.get()
    if not context or headers is None:
        return
    for key, header in MESSAGE_HEADERS.items():
        if key in context:
            headers.setdefault(header, context[key])


def enter_task(task_id: str | None = None, task: Any = None, **signal: Any) -> None:
    """`task_prerun`: the task's lines carry its id and the fields its message brought."""
    request = getattr(task, "request", None)
    values: dict[str, Any] = {"task_id": task_id}
    for key, header in MESSAGE_HEADERS.items():
        values[key] = request.get(header) if request is not None else None
    if values["user_id"] is None:  # queued without a request (a sweep): the task says whom
        values["user_id"] = (signal.get("kwargs") or {}).get("user_id")
    fresh = {k: v for k, v in ((k, _sane(k, v)) for k, v in values.items()) if v is not None}
    # Run in place (task.apply(): no message, no headers): it belongs to the caller's request.
    inherited = (_context.get() or {}) if getattr(request, "is_eager", False) else {}
    token = _context.set({**inherited, **fresh})
    if request is not None:
        request.flowpins_log_context = token


def leave_task(task: Any = None, **_: Any) -> None:
    """`task_postrun`: a pool thread runs the next task with a clean context."""
    request = getattr(task, "request", None)
    token = getattr(request, "flowpins_log_context", None) if request is not None else None
    if token is None:
        return
    try:
        _context.reset(token)
    except ValueError:  # set in another context (cannot happen in one thread): just clear it
        _context.set(None)


# -- log records -------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields of the
    request or task being served (None where unknown), and the exception (its traceback as
    text, secrets masked). It reads the context itself, so it needs no filter on the handler."""

    def format(self, record: logging.LogRecord) -> str:
        context = _context.get() or {}
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:  # from `extra=` when given, else this request's or task's
            value = getattr(record, key, None)
            entry[key] = value if value is not None else context.get(key)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack_info"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)
