"""Defence in depth for the rules "secrets never reach a log line" and "one record, one line".

The code never logs a token on purpose; this filter masks anything that still looks like one
(`access_token=...`, `"refresh_token": "..."`, `auth=...`, `AUTH_ID`, `client_secret`, ...), in the
message and in its arguments, before any handler formats it. It also escapes control characters
(newline, CR, ESC, ...): a logged value comes from a request at times (an event name, a portal's
error text), and a newline in it would start a line that looks like a record of its own.
"""

from __future__ import annotations

import logging
import re
from typing import Any

SECRET_KEYS = (
    "access_token",
    "refresh_token",
    "client_secret",
    "application_token",
    "auth_id",
    "refresh_id",
    "auth",
    "token",
)
_KEYS = "|".join(SECRET_KEYS)
_PATTERN = re.compile(
    # Bitrix24's event fields come as auth[access_token]=…, also URL-encoded (auth%5B…%5D=).
    rf"""(?P<key>["']?(?:{_KEYS})(?:\]|%5D)?["']?\s*[=:]\s*["']?)(?P<value>[^"'&\s,}}\]]+)""",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    return _PATTERN.sub(lambda m: m.group("key") + "***", text)


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators (some log viewers and
# JSON-lines shippers break lines on those too).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (newline as \\n, ESC as \\x1b): never a new line."""
    return _CONTROL.sub(_escaped, text)


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not drop the record
            return True
        cleaned = escape_controls(redact(message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """Django's LOGGING: one console handler, every record through the filter above, in
    `log_format` ("text", or "json": one object per line, b24app.logcontext.JsonFormatter)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "b24app.logging.RedactSecretsFilter"}},
        "formatters": {
            "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
            "json": {"()": "b24app.logcontext.JsonFormatter"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": log_format,
                "filters": ["redact"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # These libraries log request bodies and tokens at DEBUG: never let them.
            "oauthlib": {"level": "WARNING"},
            "requests_oauthlib": {"level": "WARNING"},
            "urllib3": {"level": "WARNING"},
            "celery": {"level": "INFO"},
            # no text copy of Django's records (DEBUG) beside the JSON ones
            **({"django": {"handlers": []}} if log_format == "json" else {}),
        },
    }
