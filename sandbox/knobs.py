"""Fault and limit knobs: the :class:`Knobs` record and the parser of knob values.

Knob values arrive from JSON (the control API), from the CLI (``--knob name=value``) and as
``SandboxServer(**knobs)`` keywords; :func:`coerce_knob` turns any of them into the knob's type
or raises :class:`KnobError`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

DEFAULT_SCOPE = "task,placement"


@dataclass(frozen=True)
class Knobs:
    """Fault and limit knobs. Global values, optionally overridden per portal.

    ``seed`` is global only (it seeds the one random generator used for all ratios).
    """

    latency_ms: float = 0.0
    pin_drop_ratio: float = 0.0
    refresh_drop_ratio: float = 0.0
    error_5xx_ratio: float = 0.0
    rate: float = 2.0
    burst: float = 50.0
    token_ttl: float = 3600.0
    refresh_ttl: float = 180 * 86400.0
    flow_list_enabled: bool = True
    operating_cost: float = 0.0
    operating_limit: float = 420.0
    operating_bucket_seconds: float = 60.0
    payment_expired: bool = False
    portal_deleted: bool = False
    pin_error_status: int = 400
    scope: str = DEFAULT_SCOPE
    handler_url_check: bool = True
    malformed_answers: bool = False
    # A batch's command at this position (0-based; -1: none) answers `batch_fail_code` instead
    # of running; with halt, nothing after it runs either.
    batch_fail_at: int = -1
    batch_fail_code: str = "INTERNAL_SERVER_ERROR"
    # The portal stops running a batch at this position (-1: never) and its answer is lost: the
    # commands before it ran, the rest did not (a portal that died mid-request).
    batch_cut_at: int = -1
    # Every REST call answers 302 to this base (+ the method, query kept) instead of running:
    # a portal, or something in front of it, sending the app elsewhere ("" = never).
    rest_redirect: str = ""
    seed: int = 0


KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Knobs))
GLOBAL_ONLY_KNOBS = frozenset({"seed"})
_KNOB_TYPES: dict[str, type] = {name: type(getattr(Knobs(), name)) for name in KNOB_NAMES}
_RATIO_KNOBS = frozenset({"pin_drop_ratio", "refresh_drop_ratio", "error_5xx_ratio"})
_POSITIVE_KNOBS = frozenset(
    {"rate", "burst", "token_ttl", "refresh_ttl", "operating_bucket_seconds"}
)


class KnobError(ValueError):
    """Unknown knob or a value of the wrong type/range."""


def coerce_knob(name: str, value: Any) -> Any:
    """Validate and convert a knob value (JSON or CLI input) to the knob's type."""
    if name not in _KNOB_TYPES:
        raise KnobError(f"unknown knob {name!r}; known: {', '.join(KNOB_NAMES)}")
    kind = _KNOB_TYPES[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "y", "n", "on", "off"):
                    raise ValueError(value)
                result: Any = lowered in ("1", "true", "yes", "y", "on")
            else:
                result = bool(value)
        elif kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            result = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(value)
        else:
            result = str(value)
    except (TypeError, ValueError) as exc:
        raise KnobError(f"knob {name!r}: bad value {value!r}") from exc
    if name in _RATIO_KNOBS and not 0.0 <= result <= 1.0:
        raise KnobError(f"knob {name!r} must be within 0..1")
    if name in _POSITIVE_KNOBS and result <= 0:
        raise KnobError(f"knob {name!r} must be > 0")
    if name in ("latency_ms", "operating_cost", "operating_limit") and result < 0:
        raise KnobError(f"knob {name!r} must be >= 0")
    if name in ("batch_fail_at", "batch_cut_at") and not -1 <= result < 50:
        raise KnobError(f"knob {name!r} must be a batch position (0..49) or -1")
    if name == "rest_redirect" and result and not _is_rest_base(result):
        raise KnobError("knob 'rest_redirect' must be an http(s) URL ending in /rest/, or empty")
    if name == "pin_error_status" and not 200 <= result <= 599:
        raise KnobError("knob 'pin_error_status' must be an HTTP status (200..599)")
    return result


def _is_rest_base(url: str) -> bool:
    return url.startswith(("http://", "https://")) and url.endswith("/rest/")
