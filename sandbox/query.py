"""Minimal filter / select / order support for the list methods, Bitrix style.

Filter keys carry an operator prefix: ``{"ID": 1}``, ``{"@ID": [1, 2]}``, ``{">FLOW_ID": 0}``,
``{"!ACTIVE": "N"}``, ``{"><EFFICIENCY": [10, 50]}``, ``{"%NAME": "продаж"}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# longest first, so ">=" wins over ">"
FILTER_OPERATORS = (
    "!><",
    "><",
    ">=",
    "<=",
    "!=",
    "<>",
    "=%",
    "%=",
    "!%",
    "!@",
    "@",
    "=",
    "%",
    ">",
    "<",
    "!",
)
_NEGATIVE = frozenset({"!", "!=", "<>", "!@", "!%", "!><"})
_TRUE = frozenset({"y", "yes", "true", "1", "on"})


def split_filter_key(key: str) -> tuple[str, str]:
    """``">=ID"`` -> ``(">=", "ID")``; field names are upper-cased."""
    for op in FILTER_OPERATORS:
        if key.startswith(op):
            return op, key[len(op) :].upper()
    return "", key.upper()


def as_list(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, list | tuple | set):
        return list(value)
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",")]
    return [value]


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            return int(float(str(value).strip()))
        except ValueError:
            return None


def _coerce(actual: Any, expected: Any) -> tuple[Any, Any]:
    """Bring ``expected`` to the type of ``actual`` so they compare like SQL would."""
    if isinstance(actual, bool):
        return actual, _to_bool(expected)
    if isinstance(actual, int) or actual is None:
        exp = _to_int(expected)
        return (0 if actual is None else actual), exp
    return ("" if actual is None else str(actual)), ("" if expected is None else str(expected))


def _like(pattern: str, text: str) -> bool:
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("%")) + "$"
    return re.match(regex, text, flags=re.IGNORECASE | re.DOTALL) is not None


def _match_scalar(actual: Any, op: str, expected: Any) -> bool:
    base = "" if op == "=" else op
    if base == "" and isinstance(expected, list | tuple | Mapping):
        return any(_match_scalar(actual, "", item) for item in as_list(expected))
    if base == "@":
        return any(_match_scalar(actual, "", item) for item in as_list(expected))
    if base == "><":
        bounds = as_list(expected)
        if len(bounds) != 2:
            return False
        low = _coerce(actual, bounds[0])
        high = _coerce(actual, bounds[1])
        if low[1] is None or high[1] is None:
            return False
        return bool(low[1] <= low[0] <= high[1])
    if base == "%":
        return str(expected).lower() in ("" if actual is None else str(actual)).lower()
    if base in ("=%", "%="):
        return _like(str(expected), "" if actual is None else str(actual))
    left, right = _coerce(actual, expected)
    if right is None:
        return False
    if base == "":
        return bool(left == right)
    if base == ">":
        return bool(left > right)
    if base == ">=":
        return bool(left >= right)
    if base == "<":
        return bool(left < right)
    if base == "<=":
        return bool(left <= right)
    return False


def matches(actual: Any, op: str, expected: Any) -> bool:
    """Evaluate one filter condition. A list ``actual`` matches if any element does."""
    if op in _NEGATIVE:
        positive = {"!": "", "!=": "", "<>": "", "!@": "@", "!%": "%", "!><": "><"}[op]
        return not matches(actual, positive, expected)
    if isinstance(actual, list):
        return any(_match_scalar(item, op, expected) for item in actual)
    return _match_scalar(actual, op, expected)


def sort_key(value: Any) -> tuple[int, Any]:
    """Sort None first, then numbers, then strings (stable mixed-type ordering)."""
    if value is None:
        return (0, 0)
    if isinstance(value, bool | int | float):
        return (1, value)
    return (2, str(value).lower())
