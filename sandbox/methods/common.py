"""What every REST method handler gets (:class:`CallContext`) and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..knobs import Knobs
from ..model import EventBinding, PlacementBinding, Portal, TokenPair, User
from ..query import as_list, sort_key
from ..state import SandboxState
from ..wire import RestError

PAGE_SIZE = 50
_T = TypeVar("_T")


@dataclass
class CallContext:
    """Everything a method handler may need for one (sub-)call."""

    state: SandboxState
    portal: Portal
    user: User
    token: TokenPair
    knobs: Knobs
    now: float
    drop_response: bool = False  # set by a handler to lose the HTTP response
    in_batch: bool = False


@dataclass
class MethodResult:
    result: Any
    total: int | None = None
    next: int | None = None


Handler = Callable[[CallContext, dict[str, Any]], Any]


def upper_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in params.items()}


def as_text(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def require_admin(ctx: CallContext, detail: str = "") -> None:
    if not ctx.user.admin:
        raise RestError(403, "ACCESS_DENIED", "Access denied!" + (f" {detail}" if detail else ""))


def argument_null(name: str) -> RestError:
    return RestError(400, "ERROR_ARGUMENT", f"Argument '{name}' is null or empty")


def check_handler_url(url: str, knobs: Knobs) -> None:
    """``HandlerHelper::checkCallback``: a host containing a dot, scheme http or https."""
    if not knobs.handler_url_check:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or host.find(".") <= 0:
        raise RestError(400, "ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    if parts.scheme not in ("http", "https"):
        raise RestError(400, "ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")


def start_offset(params: Mapping[str, Any]) -> int:
    value = as_int(params.get("start"))
    if value is None:
        return 0
    return value if value == -1 else max(value, 0)


def sorter(getter: Callable[[_T], Any]) -> Callable[[_T], tuple[int, Any]]:
    def key(item: _T) -> tuple[int, Any]:
        return sort_key(getter(item))

    return key


def field_list(raw: Any) -> list[str]:
    if raw is None or raw == "":
        return []
    return [str(v).upper() for v in as_list(raw)]


_Binding = TypeVar("_Binding", PlacementBinding, EventBinding)


def without(
    bindings: list[_Binding], match: Callable[[_Binding], bool], user_id: int | None
) -> tuple[list[_Binding], int]:
    """The bindings an unbind leaves, and how many it removed (of one user's, if given)."""
    keep = [b for b in bindings if not (match(b) and (user_id is None or b.user_id == user_id))]
    return keep, len(bindings) - len(keep)
