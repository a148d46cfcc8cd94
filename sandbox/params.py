"""PHP-style request parameter handling.

Bitrix24 is a PHP application, so a form-encoded body or a query string is decoded the way
PHP's ``parse_str`` decodes it: ``filter[ID]=1`` becomes ``{"filter": {"ID": "1"}}``,
``select[]=ID&select[]=TITLE`` and ``select[0]=ID&select[1]=TITLE`` both become
``{"select": ["ID", "TITLE"]}``, and nesting works to any depth
(``filter[@ID][]=1&filter[@ID][]=2``).

A PHP array whose keys are exactly ``0..n-1`` in order is a *list* (that is also what
``json_encode`` produces), anything else is a mapping with string keys. :func:`php_array`
applies the same rule to values built in Python, so an empty result map serialises as
``[]`` exactly like PHP does.

:func:`flatten` is the inverse (``http_build_query``): it turns nested data into bracket
keys, used to build event payloads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias
from urllib.parse import parse_qsl

__all__ = [
    "ParamError",
    "flatten",
    "parse_body",
    "parse_php_pairs",
    "parse_php_query",
    "php_array",
]

_INT_KEY = re.compile(r"^(0|-?[1-9][0-9]*)$")

PhpKey: TypeAlias = int | str


class ParamError(ValueError):
    """The request body could not be decoded."""


class _PhpArray:
    """An ordered PHP array under construction (keys are ``int`` or ``str``)."""

    __slots__ = ("items", "next_index")

    def __init__(self) -> None:
        self.items: dict[PhpKey, Any] = {}
        self.next_index = 0

    def set(self, key: PhpKey | None, value: Any) -> None:
        if key is None:
            key = self.next_index
        if isinstance(key, int) and key >= self.next_index:
            self.next_index = key + 1
        self.items[key] = value

    def child(self, key: PhpKey | None) -> _PhpArray:
        """Return the nested array at ``key``, creating (or replacing a scalar with) one."""
        if key is not None:
            existing = self.items.get(key)
            if isinstance(existing, _PhpArray):
                return existing
        node = _PhpArray()
        self.set(key, node)
        return node


def _php_key(raw: str) -> PhpKey:
    """PHP turns canonical decimal strings into integer keys."""
    return int(raw) if _INT_KEY.match(raw) else raw


def _split_name(name: str) -> tuple[str, list[str | None]] | None:
    """Split ``a[b][][c]`` into ``("a", ["b", None, "c"])``.

    Returns ``None`` for an empty base name (PHP drops such pairs). Text after an
    unterminated bracket is ignored, as PHP does.
    """
    bracket = name.find("[")
    if bracket <= 0:
        return (name, []) if name else None
    base = name[:bracket]
    parts: list[str | None] = []
    pos = bracket
    while pos < len(name) and name[pos] == "[":
        close = name.find("]", pos)
        if close < 0:
            break
        inner = name[pos + 1 : close]
        parts.append(inner if inner != "" else None)
        pos = close + 1
    if not parts:
        # "a[b" -> PHP keeps the literal name with "[" replaced by "_".
        return (name.replace("[", "_", 1), [])
    return base, parts


def _finish(value: Any) -> Any:
    if isinstance(value, _PhpArray):
        return php_array({k: _finish(v) for k, v in value.items.items()})
    return value


def php_array(items: Mapping[Any, Any]) -> list[Any] | dict[str, Any]:
    """Convert a PHP-like ordered map into what ``json_encode`` would emit.

    Keys ``0..n-1`` (ints or canonical integer strings) in insertion order give a list;
    anything else (including a gap or a different order) gives a dict with string keys.
    An empty map is an empty list, as in PHP.
    """
    keys = list(items.keys())
    sequential = True
    for index, key in enumerate(keys):
        if isinstance(key, bool) or _php_key(str(key)) != index:
            sequential = False
            break
    if sequential:
        return [items[k] for k in keys]
    return {str(k): v for k, v in items.items()}


def parse_php_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Build nested parameters from already-decoded ``(name, value)`` pairs."""
    root = _PhpArray()
    for name, value in pairs:
        split = _split_name(name)
        if split is None:
            continue
        base, parts = split
        node = root
        key: PhpKey | None = _php_key(base)
        for part in parts:
            node = node.child(key)
            key = None if part is None else _php_key(part)
        node.set(key, value)
    result = php_array({k: _finish(v) for k, v in root.items.items()})
    if isinstance(result, list):
        # Top-level keys are always names; a query like "0=a" still maps "0" -> "a".
        return {str(i): v for i, v in enumerate(result)}
    return result


def parse_php_query(query: str) -> dict[str, Any]:
    """Decode a query string / form body like PHP's ``parse_str``."""
    if not query:
        return {}
    return parse_php_pairs(parse_qsl(query, keep_blank_values=True))


def parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    """Decode a request body: JSON, form-encoded, or (unlabelled) whichever fits.

    Raises :class:`ParamError` for a JSON body that is not a JSON object.
    """
    if not body:
        return {}
    ctype = content_type.split(";", 1)[0].strip().lower()
    text = body.decode("utf-8", errors="replace")
    looks_json = text.lstrip()[:1] in ("{", "[")
    if ctype == "application/json" or (ctype not in _FORM_TYPES and looks_json):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ParamError(f"Invalid JSON body: {exc}") from exc
        if isinstance(data, list):
            return {str(i): v for i, v in enumerate(data)}
        if not isinstance(data, dict):
            raise ParamError("JSON body must be an object")
        return data
    if ctype.startswith("multipart/"):
        raise ParamError("multipart bodies are not supported by the sandbox")
    return parse_php_query(text)


_FORM_TYPES = ("application/x-www-form-urlencoded",)


def _scalar(value: Any) -> str | None:
    """``http_build_query`` scalar conversion; ``None`` means "omit"."""
    if value is None:
        return None
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Turn nested data into bracket-keyed pairs, like PHP's ``http_build_query``."""
    pairs: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, Mapping):
            pairs.extend(flatten(value, name))
        elif isinstance(value, list | tuple):
            pairs.extend(flatten({str(i): v for i, v in enumerate(value)}, name))
        else:
            scalar = _scalar(value)
            if scalar is not None:
                pairs.append((name, scalar))
    return pairs
