"""Prometheus metrics: every definition, and what moves them. The facts read at scrape time and
the registry that `/metrics` (b24app.metrics_view) serves are in b24app.metrics_facts. Off
unless METRICS_TOKEN is set.

Several processes report: gunicorn's workers and the Celery workers. With
PROMETHEUS_MULTIPROC_DIR set (`make run` and compose set it; it must be set before the process
starts, and emptied before they all start), each process writes its counters and histograms to
files there, and a scrape adds them up (MultiProcessCollector). A dead process's files stay:
its counts are part of the totals. There are no per-process gauges, so nothing needs marking
dead when one exits (`mark_process_dead` only removes live gauges' files).

What is really a fact of the database or Redis — pins waiting, tasks queued, which portals'
buckets hold calls back — is read when Prometheus asks (`Facts`), never kept in a process's
memory: per-process copies would disagree, add up wrongly across processes, and outlive the
process that set them.

Labels stay bounded: a REST method is one our own code names; a result is a known error code
or a class of them; a problem is one of `Problem`'s codes. No label holds a token, a domain or
anything a portal or a user sends. Portals (thousands) are no label of any process metric:
the limiter's waits per portal are kept in Redis per minute and only the top PORTALS_SHOWN of
the last LIMITER_WINDOW are shown, by `member_id`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from prometheus_client import (
    Counter,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.exceptions import RedisError

from b24app.bitrix.errors import _PERMANENT, _TOKENS, _TRANSIENT, BitrixError
from b24app.problems import Problem
from b24app.redisconn import redis_client

log = logging.getLogger(__name__)

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def _process_id() -> str:
    # compose's web and worker containers share the directory, and pids repeat across
    # containers: the host name (the container's) keeps their files apart.
    return f"{socket.gethostname()}-{os.getpid()}"


def _use_directory(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


# Before any metric is made: each then writes to this process's files. A directory that cannot
# be written falls back to this process's memory, with a warning: a metric never stops the app.
if MULTIPROC_DIR and _use_directory(MULTIPROC_DIR):
    values.ValueClass = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]
else:
    if MULTIPROC_DIR:
        log.warning("PROMETHEUS_MULTIPROC_DIR cannot be written: metrics of this process only")
    # Also for a variable set but empty, which prometheus-client takes for a directory (".").
    values.ValueClass = values.MutexValue
    MULTIPROC_DIR = ""


# One process or many, a scrape shows the same series (the multiprocess mode has no _created).
disable_created_metrics()  # type: ignore[no-untyped-call]


def enabled() -> bool:
    """Whether anybody may scrape: then the measurements that cost a query are taken too."""
    return bool(settings.METRICS_TOKEN)


# --- pins ------------------------------------------------------------------------------------

PIN_TOGGLES = Counter(
    "flowpins_pin_toggles",
    "tasks.flow.Flow.pin toggles sent to converge clicks, by what their answer said "
    "(pinned, unpinned, unreadable; lost: the answer never came)",
    ["answer"],
)
PINS_SETTLED = Counter(
    "flowpins_pins_settled",
    "Pin intents settled, by outcome (done, failed) and the failure's problem code",
    ["outcome", "problem"],
)
CLICK_TO_SETTLED = Histogram(
    "flowpins_click_to_settled_seconds",
    "From a click to its intent settled (done or failed)",
    ["outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)

# --- REST calls, tokens, the limiter ---------------------------------------------------------

REST_CALLS = Counter(
    "flowpins_rest_calls",
    "Requests to portals' REST API, by method, result (ok or the error code) and HTTP status",
    ["method", "result", "status"],
)
REST_BATCH_COMMANDS = Counter(
    "flowpins_rest_batch_commands",
    "Commands carried by batch requests to portals, by the request's result",
    ["result"],
)
REST_SECONDS = Histogram(
    "flowpins_rest_call_seconds",
    "Duration of requests to portals' REST API, by method",
    ["method"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKEN_REFRESHES = Counter(
    "flowpins_token_refreshes",
    "Refreshes of a user's tokens at the OAuth server, by result (ok, or the error's type)",
    ["result"],
)
LIMITER_WAIT = Histogram(
    "flowpins_limiter_wait_seconds",
    "Time a call slept for its portal's request budget (the shared bucket), by lane "
    "(bulk: a Pin all's rounds, which leave a few slots to interactive calls)",
    ["lane"],
    buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
LIMITER_DEFERRED = Counter(
    "flowpins_limiter_deferred",
    "Calls that found their portal's bucket full for longer than they may wait (the job "
    "steps aside and comes back), by lane",
    ["lane"],
)
# Every metric has labels, so a process makes its files only when it counts something: the
# short-lived ones that load the app (compose's `celery inspect ping` every 30 s) leave none.

# Error codes that may be a label value: the error table's, and the client's own.
_CODES = frozenset(_TRANSIENT) | frozenset(_TOKENS) | frozenset(_PERMANENT)
_OWN_CODES = {
    "READ_TIMEOUT", "CONNECT_TIMEOUT", "RESPONSE_LOST", "CONNECTION_ERROR", "MOVED",
    "RESPONSE_TOO_LARGE", "BAD_REDIRECT", "LOCAL_RATE_LIMIT",
}  # fmt: skip
_STATUSES = {200, 301, 302, 307, 308, 400, 401, 403, 404, 429, 500, 502, 503, 504}
_PROBLEMS = frozenset(Problem.values)


def result_label(error: str) -> str:
    """A REST call's result as a bounded label: ok, a known code, HTTP_5xx/HTTP_4xx, or other
    (a portal may answer any string)."""
    if not error:
        return "ok"
    if error in _CODES or error in _OWN_CODES:
        return error
    if error == "0":  # flow methods' "access denied or not found"
        return "ACCESS_DENIED"
    if error.startswith("HTTP_") and len(error) > 5 and error[5] in "45":
        return f"HTTP_{error[5]}xx"
    return "other"


def status_label(status: int | None) -> str:
    if status is None:
        return "none"  # no answer came
    return str(status) if status in _STATUSES else f"{str(status)[:1]}xx"


def rest_call(method: str, status: int | None, error: str, seconds: float, commands: int) -> None:
    REST_CALLS.labels(method[:100], result_label(error), status_label(status)).inc()
    REST_SECONDS.labels(method[:100]).observe(seconds)
    if method == "batch":
        REST_BATCH_COMMANDS.labels(result_label(error)).inc(commands)


@contextmanager
def counted_refresh() -> Iterator[None]:
    """Count one refresh at the OAuth server by how it ended."""
    try:
        yield
    except BitrixError as exc:
        TOKEN_REFRESHES.labels(type(exc).__name__).inc()
        raise
    TOKEN_REFRESHES.labels("ok").inc()


# The limiter's waits per portal: seconds per member_id, one sorted set per minute.
LIMITER_WINDOW = timedelta(minutes=5)
PORTALS_SHOWN = 10
_LIMITER_KEY = "fp:metrics:limiter:{minute}"


def limiter_waited(member_id: str, seconds: float, *, deferred: bool, bulk: bool) -> None:
    """A call slept `seconds` for its portal's bucket, or (`deferred`) steps aside that long."""
    lane = "bulk" if bulk else "interactive"
    if deferred:
        LIMITER_DEFERRED.labels(lane).inc()
    else:
        LIMITER_WAIT.labels(lane).observe(seconds)
    if seconds <= 0 or not enabled():
        return
    key = _LIMITER_KEY.format(minute=int(time.time() // 60))
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.zincrby(key, seconds, member_id)
        pipe.expire(key, int(LIMITER_WINDOW.total_seconds()) + 120)
        pipe.execute()
    except RedisError:
        pass  # a measurement never fails a call


def pin_toggles(answer: str, count: int = 1) -> None:
    if count:
        PIN_TOGGLES.labels(answer).inc(count)


def pins_settled(outcome: str, problem: str, waits: Sequence[float] | None, count: int) -> None:
    """`count` intents settled; `waits`: each one's seconds since its click, when measured."""
    if not count:
        return
    label = problem if problem in _PROBLEMS else "other"
    PINS_SETTLED.labels(outcome, label or "none").inc(count)
    for wait in waits or ():
        CLICK_TO_SETTLED.labels(outcome).observe(max(0.0, wait))


# --- facts read at scrape time ----------------------------------------------------------------

Fact = Callable[[], Iterable[Metric]]
_facts: list[Fact] = []


def register_fact(fact: Fact) -> None:
    """A feature's scrape-time facts (flows: the intents waiting); `b24app` imports no feature."""
    if fact not in _facts:
        _facts.append(fact)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
