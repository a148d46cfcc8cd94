"""Query strings the PHP way, for batch commands."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote


def php_query(params: Mapping[str, Any], prefix: str = "") -> str:
    """Encode params the way PHP's http_build_query does (`filter[ID]=1&select[0]=ID`).

    Batch commands are "method?query" strings that the portal parses with PHP rules.
    """
    parts: list[str] = []

    def walk(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{key}[{k}]", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{key}[{i}]", v)
        else:
            if isinstance(value, bool):
                value = "1" if value else "0"
            elif value is None:
                value = ""
            parts.append(f"{quote(key, safe='[]')}={quote(str(value), safe='')}")

    for k, v in params.items():
        walk(f"{prefix}[{k}]" if prefix else str(k), v)
    return "&".join(parts)
