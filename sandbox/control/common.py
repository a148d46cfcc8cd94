"""What every control route shares: the error it answers with and the parameter readers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..model import Portal


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# parameter helpers


def int_param(params: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if value is None or isinstance(value, bool):
        raise ControlError(400, f"{key!r} is required (integer)")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ControlError(400, f"{key!r} must be an integer") from exc


def bool_param(params: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(value)


def user_id_param(portal: Portal, params: Mapping[str, Any], default: int | None = 1) -> int:
    user_id = int_param(params, "user_id", default)
    if user_id not in portal.users:
        raise ControlError(400, f"portal {portal.name} has no user {user_id}")
    return user_id
