"""The portal REST entry point: ``{origin}/p/NAME/rest/<method>`` (``client_endpoint``).

Order of processing for one HTTP request (each step can end the request):

1. portal lookup - an old host/name after a rename gets ``302`` to the new address (query
   kept); with distinct hosts, a request on another host than the portal's gets 404
   ``NOT_FOUND`` ("wrong host"); the ``rest_redirect`` knob answers ``302`` to its base;
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

import time
from typing import Any

from .methods import CallContext, execute_call, strip_suffix
from .model import Portal, iso
from .params import ParamError
from .state import SandboxState
from .wire import Reply, Request, RestError

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


def _knob_redirect(
    state: SandboxState, portal: Portal, method_name: str, req: Request
) -> Reply | None:
    """The ``rest_redirect`` knob: 302 to that base + the method (query kept), nothing run.
    Counted in ``counters.http_status["302"]``."""
    base = state.knobs_for(portal).rest_redirect
    if not base:
        return None
    query = f"?{req.query}" if req.query else ""
    return _record(portal, Reply.redirect(f"{base}{method_name}{query}"))


def handle_portal_rest(
    state: SandboxState, portal_name: str, method_name: str, req: Request
) -> Reply:
    """Serve one portal REST request (see the module docstring for the order of checks),
    counted in ``state.traffic`` while it is served."""
    state.traffic.enter()
    try:
        return _serve_rest(state, portal_name, method_name, req)
    finally:
        state.traffic.leave()


def _serve_rest(state: SandboxState, portal_name: str, method_name: str, req: Request) -> Reply:
    arrived = state.clock()
    with state.lock:
        found, portal = state.locate(req.local_host, portal_name)
        if found == "moved" and portal is not None:
            return Reply.redirect(state.location(portal, f"rest/{method_name}", req.query))
        if found == "wrong_host":
            return wrong_host(state, portal_name, req.local_host, portal)
        if portal is None:
            return Reply.error(404, "PORTAL_NOT_FOUND", f"Portal {portal_name!r} does not exist")
        redirect = _knob_redirect(state, portal, method_name, req)
        if redirect is not None:
            return redirect
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
