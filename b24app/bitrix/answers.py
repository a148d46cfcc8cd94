"""Reading a portal's answer: a body under a size cap, JSON or nothing, and the numbers in it
taken only when they are whole numbers (a hostile portal decides what it sends)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

import requests

from b24app.bitrix.errors import ResponseLost

# An answer larger than this is refused, not buffered: a hostile or broken portal must not be
# able to fill a worker's memory. Real answers (50 flows, a batch of 50 toggles) are kilobytes.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


def read_capped(response: requests.Response, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of a streamed response, up to `limit` bytes; more is ResponseLost (the request
    may have been applied, but its answer cannot be read)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        response.close()
        raise ResponseLost("RESPONSE_TOO_LARGE", f"the answer is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_content(64 * 1024):
            size += len(chunk)
            if size > limit:
                response.close()
                raise ResponseLost("RESPONSE_TOO_LARGE", f"the answer is over {limit} bytes")
            chunks.append(chunk)
    except requests.exceptions.ConnectionError as exc:
        if "timed out" in repr(exc):  # a stalled body after the headers: a read timeout
            raise requests.exceptions.ReadTimeout(str(exc)) from exc
        raise
    return b"".join(chunks)


def json_body(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(read_capped(response))
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else {"result": body}


def as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def ints(value: Any) -> dict[str, int]:
    """A batch's totals or nexts by key; a value that is no whole number is left out."""
    out: dict[str, int] = {}
    for key, raw in as_dict(value).items():
        number = int_or_none(raw)
        if number is not None:
            out[key] = number
    return out


_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,18}")


def int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):  # not "--5": int() refuses it
        return int(value)
    return None


def reset_at(time_block: Any) -> float:
    if isinstance(time_block, Mapping):
        try:
            return float(time_block.get("operating_reset_at") or 0) or time.time() + 60
        except (TypeError, ValueError):
            pass
    return time.time() + 60
