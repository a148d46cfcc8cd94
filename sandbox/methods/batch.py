"""``batch``: up to 50 commands in one request, later ones may refer to earlier results."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..params import parse_php_query, php_array
from ..wire import RestError
from .common import CallContext, upper_keys
from .registry import execute_call, strip_suffix

BATCH_MAX_LENGTH = 50

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


def batch(ctx: CallContext, params: dict[str, Any]) -> Any:
    """``CRestProvider::methodsBatch``: HTTP 200 even when sub-commands fail."""
    p = upper_keys(params)
    halt = _truthy(p.get("HALT"))
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
        for position, (key, command) in enumerate(_commands(p.get("CMD"))):
            error: RestError | None
            if position == ctx.knobs.batch_cut_at:  # the portal died here: no answer at all
                ctx.drop_response = True
                break
            if position >= BATCH_MAX_LENGTH:
                error = RestError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
            elif not isinstance(command, str):
                continue
            elif position == ctx.knobs.batch_fail_at:
                error = RestError(500, ctx.knobs.batch_fail_code, "injected by batch_fail_at")
            else:
                error = _run_command(ctx, key, command, tables)
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


def _commands(commands: Any) -> list[tuple[str, Any]]:
    """``cmd`` as (key, command) pairs: a list is keyed by position."""
    if isinstance(commands, list):
        return [(str(i), c) for i, c in enumerate(commands)]
    if isinstance(commands, Mapping):
        return [(str(k), c) for k, c in commands.items()]
    return []


def _run_command(
    ctx: CallContext, key: str, command: str, tables: dict[str, dict[str, Any]]
) -> RestError | None:
    """Run one ``method?query`` command and file its outcome under ``key``; the error, if any."""
    name, _, query = command.partition("?")
    name = strip_suffix(name.strip())
    if name.lower() == "batch":
        return RestError(
            405,
            "ERROR_BATCH_METHOD_NOT_ALLOWED",
            "Method is not allowed for batch usage",
        )
    sub_params = _substitute(parse_php_query(query), tables)
    try:
        outcome = execute_call(ctx, name, sub_params)
    except RestError as exc:
        return exc
    tables["result"][key] = outcome.result
    if outcome.total is not None:
        tables["total"][key] = outcome.total
    if outcome.next is not None:
        tables["next"][key] = outcome.next
    tables["time"][key] = outcome.time
    return None
