"""Defence in depth for the rule "secrets never reach a log line".

The code never logs a token on purpose; this filter masks anything that still looks like one
(`access_token=...`, `"refresh_token": "..."`, `auth=...`, `AUTH_ID`, `client_secret`, ...), in the
message and in its arguments, before any handler formats it.
"""

from __future__ import annotations

import logging
import re

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
    rf"""(?P<key>["']?(?:{_KEYS})["']?\s*[=:]\s*["']?)(?P<value>[^"'&\s,}}\]]+)""",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    return _PATTERN.sub(lambda m: m.group("key") + "***", text)


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not drop the record
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
