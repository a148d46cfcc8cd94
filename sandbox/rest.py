"""The portal REST entry point: ``{origin}/p/NAME/rest/<method>`` (``client_endpoint``).

Order of processing for one HTTP request (each step can end the request):

1. portal lookup - an old host/name after a rename gets ``302`` to the new address (query
   kept); with distinct hosts, a request on another host than the portal's gets 404
   ``NOT_FOUND`` ("wrong host");
2. ``latency_ms`` sleep (outside the lock);
3. ``portal_deleted`` -> 500 ``PORTAL_DELETED``;
4. ``error_5xx_ratio`` -> 500 ``INTERNAL_SERVER_ERROR`` (JSON) or 502 (nginx HTML), before
   anything is executed;
5. leaky bucket (per portal) -> 503 ``QUERY_LIMIT_EXCEEDED``; a ``batch`` is one request;
6. auth (Bearer header, ``auth``, ``access_token``) -> 401 ``NO_AUTH_FOUND`` / ``expired_token``;
7. method lookup (lower-case first, then exact) -> 404 ``ERROR_METHOD_NOT_FOUND``;
8. scope -> 401 ``insufficient_scope``;
9. operating time per method -> 429 ``OPERATION_TIME_LIMIT`` (with ``time.operating_reset_at``);
10. the method; a dropped ``tasks.flow.Flow.pin`` (``pin_drop_ratio``) closes the connection
    without a response after the toggle was applied.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .methods import (
    CallContext,
    MethodResult,
    find_method,
    has_scope,
    method,
    upper_keys,
)
from .model import Portal, iso
from .params import ParamError, parse_php_query, php_array
from .state import SandboxState
from .wire import Reply, Request, RestError

BATCH_MAX_LENGTH = 50

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
}


def no_auth() -> RestError:
    return RestError(401, "NO_AUTH_FOUND", "Wrong authorization data")


def expired_token() -> RestError:
    return RestError(401, "expired_token", "The access token provided has expired.")


def time_block(
    start: float, finish: float, processing: float, operating: float, reset_at: int
) -> dict[str, Any]:
    return {
        "start": round(start, 6),
        "finish": round(finish, 6),
        "duration": round(finish - start, 6),
        "processing": round(processing, 6),
        "date_start": iso(start),
        "date_finish": iso(finish),
        "operating_reset_at": reset_at,
        "operating": round(operating, 6),
    }


@dataclass
class CallOutcome:
    result: Any
    total: int | None
    next: int | None
    time: dict[str, Any]


def strip_suffix(name: str) -> str:
    for suffix in (".json", ".xml"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def execute_call(ctx: CallContext, name: str, params: dict[str, Any]) -> CallOutcome:
    """Run one method (top level or inside a batch) with limits and accounting."""
    state, portal, knobs = ctx.state, ctx.portal, ctx.knobs
    started = state.clock()
    spec = find_method(name, knobs)
    if spec is None:
        raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
    if not has_scope(ctx.token.scope, spec.scopes):
        raise RestError(
            401,
            "insufficient_scope",
            "The request requires higher privileges than provided by the access token",
        )
    width = knobs.operating_bucket_seconds
    meter = portal.operating
    if spec.counts_operating and meter.blocked(spec.name, started, width, knobs.operating_limit):
        reset_at = meter.reset_at(spec.name, started, width)
        operating = meter.total(spec.name, started, width)
        raise RestError(
            429,
            "OPERATION_TIME_LIMIT",
            "Method is blocked due to operation time limit.",
            {"time": time_block(started, state.clock(), 0.0, operating, reset_at)},
        )
    portal.counters.bump(portal.counters.calls, spec.name)
    try:
        value = spec.handler(ctx, params)
    finally:
        if spec.counts_operating:
            meter.add(spec.name, started, width, knobs.operating_cost)
    finished = state.clock()
    outcome = value if isinstance(value, MethodResult) else MethodResult(value)
    operating = meter.total(spec.name, finished, width) if spec.counts_operating else 0.0
    reset_at = meter.reset_at(spec.name, finished, width)
    return CallOutcome(
        outcome.result,
        outcome.total,
        outcome.next,
        time_block(started, finished, finished - started, operating, reset_at),
    )


# --------------------------------------------------------------------------------------------
# batch

_REFERENCE = re.compile(r"\$(result|error|total|next|time)\[([^\]]+)\]((?:\[[^\]]*\])*)")


def _resolve_reference(match: re.Match[str], tables: Mapping[str, Mapping[str, Any]]) -> Any:
    table = tables[match.group(1)]
    value: Any = table.get(match.group(2), None)
    for part in re.findall(r"\[([^\]]*)\]", match.group(3)):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _substitute(value: Any, tables: Mapping[str, Mapping[str, Any]]) -> Any:
    """Resolve ``$result[cmd][field]`` references to earlier results (``ParseBatchQuery``)."""
    if isinstance(value, dict):
        return {k: _substitute(v, tables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, tables) for v in value]
    if not isinstance(value, str) or "$" not in value:
        return value
    whole = _REFERENCE.fullmatch(value)
    if whole:
        resolved = _resolve_reference(whole, tables)
        return value if resolved is None else resolved

    def repl(match: re.Match[str]) -> str:
        resolved = _resolve_reference(match, tables)
        if resolved is None or isinstance(resolved, dict | list):
            return match.group(0)
        return str(resolved).lower() if isinstance(resolved, bool) else str(resolved)

    return _REFERENCE.sub(repl, value)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "n", "no")
    return bool(value)


@method("batch", operating=False)
def batch(ctx: CallContext, params: dict[str, Any]) -> Any:
    """``CRestProvider::methodsBatch``: HTTP 200 even when sub-commands fail."""
    p = upper_keys(params)
    halt = _truthy(p.get("HALT"))
    commands = p.get("CMD")
    items: list[tuple[str, Any]]
    if isinstance(commands, list):
        items = [(str(i), c) for i, c in enumerate(commands)]
    elif isinstance(commands, Mapping):
        items = [(str(k), c) for k, c in commands.items()]
    else:
        items = []
    tables: dict[str, dict[str, Any]] = {
        "result": {},
        "error": {},
        "total": {},
        "next": {},
        "time": {},
    }
    counters = ctx.portal.counters
    ctx.in_batch = True
    try:
        for position, (key, command) in enumerate(items):
            error: RestError | None = None
            if position >= BATCH_MAX_LENGTH:
                error = RestError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
            elif not isinstance(command, str):
                continue
            else:
                name, _, query = command.partition("?")
                name = strip_suffix(name.strip())
                if name.lower() == "batch":
                    error = RestError(
                        405,
                        "ERROR_BATCH_METHOD_NOT_ALLOWED",
                        "Method is not allowed for batch usage",
                    )
                else:
                    sub_params = _substitute(parse_php_query(query), tables)
                    try:
                        outcome = execute_call(ctx, name, sub_params)
                    except RestError as exc:
                        error = exc
                    else:
                        tables["result"][key] = outcome.result
                        if outcome.total is not None:
                            tables["total"][key] = outcome.total
                        if outcome.next is not None:
                            tables["next"][key] = outcome.next
                        tables["time"][key] = outcome.time
            if error is not None:
                tables["error"][key] = {"error": error.code, "error_description": error.description}
                counters.bump(counters.errors, error.code)
                if halt:
                    break
    finally:
        ctx.in_batch = False
    if ctx.knobs.malformed_answers:  # a broken proxy or portal: totals that are no numbers
        tables["total"] = {key: "n/a" for key in tables["result"]}
    return {
        "result": php_array(tables["result"]),
        "result_error": php_array(tables["error"]),
        "result_total": php_array(tables["total"]),
        "result_next": php_array(tables["next"]),
        "result_time": php_array(tables["time"]),
    }


# --------------------------------------------------------------------------------------------
# the HTTP-level entry point


def _record(portal: Portal, reply: Reply) -> Reply:
    counters = portal.counters
    counters.bump(counters.http_status, str(reply.status))
    if reply.status == 503:
        counters.http_503 += 1
    elif reply.status == 429:
        counters.http_429 += 1
    if isinstance(reply.body, dict) and "error" in reply.body:
        counters.bump(counters.errors, str(reply.body["error"]))
    reply.headers.update(CORS_HEADERS)
    return reply


def _fault(state: SandboxState, portal: Portal) -> Reply:
    portal.counters.faults_5xx += 1
    if state.rng.random() < 0.5:
        return Reply.error(500, "INTERNAL_SERVER_ERROR", "Internal server error")
    return Reply.html(502, NGINX_502)


def wrong_host(state: SandboxState, name: str, host: str, portal: Portal | None) -> Reply:
    """404 for ``/p/NAME/...`` on a host that is not the portal's (distinct hosts only)."""
    where = f" (it is served at {state.origin(portal)})" if portal is not None else ""
    return Reply.error(
        404, "NOT_FOUND", f"Portal {name!r} is not served on {host or '?'}: wrong host{where}"
    )


def handle_portal_rest(
    state: SandboxState, portal_name: str, method_name: str, req: Request
) -> Reply:
    """Serve one portal REST request (see the module docstring for the order of checks)."""
    arrived = state.clock()
    with state.lock:
        found, portal = state.locate(req.local_host, portal_name)
        if found == "moved" and portal is not None:
            return Reply.redirect(state.location(portal, f"rest/{method_name}", req.query))
        if found == "wrong_host":
            return wrong_host(state, portal_name, req.local_host, portal)
        if portal is None:
            return Reply.error(404, "PORTAL_NOT_FOUND", f"Portal {portal_name!r} does not exist")
        latency = state.knobs_for(portal).latency_ms
    if req.method == "OPTIONS":
        return Reply(status=204, body=b"", headers=dict(CORS_HEADERS))
    if latency > 0:
        time.sleep(latency / 1000.0)
    with state.lock:
        knobs = state.knobs_for(portal)
        portal.counters.requests += 1
        if knobs.portal_deleted:
            return _record(portal, Reply.error(500, "PORTAL_DELETED", "Portal was deleted"))
        if state.roll(knobs.error_5xx_ratio):
            return _record(portal, _fault(state, portal))
        if not portal.bucket.try_add(state.clock(), knobs.rate, knobs.burst):
            return _record(portal, Reply.error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"))
        try:
            params = req.params()
        except ParamError as exc:
            return _record(portal, Reply.error(400, "INVALID_REQUEST", str(exc)))
        try:
            ctx = _authenticate(state, portal, req, params)
            outcome = execute_call(ctx, strip_suffix(method_name), params)
        except RestError as exc:
            return _record(portal, exc.reply())
        if ctx.drop_response:
            portal.counters.dropped_responses += 1
            return Reply.dropped()
        body: dict[str, Any] = {"result": outcome.result}
        if outcome.total is not None:
            body["total"] = outcome.total
        if outcome.next is not None:
            body["next"] = outcome.next
        timing = dict(outcome.time)
        finished = state.clock()
        timing.update(
            start=round(arrived, 6),
            finish=round(finished, 6),
            duration=round(finished - arrived, 6),
            date_start=iso(arrived),
            date_finish=iso(finished),
        )
        body["time"] = timing
        return _record(portal, Reply.json(200, body))


def _authenticate(
    state: SandboxState, portal: Portal, req: Request, params: dict[str, Any]
) -> CallContext:
    token = req.auth_token(params)
    if not token:
        raise no_auth()
    status, pair = state.check_access_token(token)
    if pair is None or pair.member_id != portal.member_id:
        raise no_auth()
    if status == "expired":
        raise expired_token()
    user = portal.users.get(pair.user_id)
    if user is None:
        raise no_auth()
    return CallContext(
        state=state,
        portal=portal,
        user=user,
        token=pair,
        knobs=state.knobs_for(portal),
        now=state.clock(),
    )
