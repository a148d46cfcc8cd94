"""The method registry and the runner of one call (top level or inside a batch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..knobs import Knobs
from ..model import iso
from ..wire import RestError
from .common import CallContext, Handler, MethodResult


@dataclass(frozen=True)
class MethodSpec:
    name: str
    handler: Handler
    scopes: frozenset[str]  # empty: scope "basic", always granted
    counts_operating: bool = True


REGISTRY: dict[str, MethodSpec] = {}  # lookup key -> method; filled by sandbox.methods


def register(
    name: str,
    handler: Handler,
    *,
    scopes: tuple[str, ...] = (),
    case_sensitive: bool = False,
    operating: bool = True,
) -> None:
    """Add a method under its lower-cased name (its exact name if ``case_sensitive``)."""
    key = name if case_sensitive else name.lower()
    REGISTRY[key] = MethodSpec(name, handler, frozenset(scopes), operating)


def find_method(name: str, knobs: Knobs) -> MethodSpec | None:
    """Lower-cased name first, then exactly as sent (the core's REST entry point)."""
    spec = REGISTRY.get(name.lower()) or REGISTRY.get(name)
    if spec is not None and spec.name == "tasks.flow.Flow.list" and not knobs.flow_list_enabled:
        return None
    return spec


def has_scope(granted: str, required: frozenset[str]) -> bool:
    if not required:
        return True
    return bool(required.intersection(s.strip() for s in granted.split(",")))


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
