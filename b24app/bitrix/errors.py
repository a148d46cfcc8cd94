"""Bitrix24 failures as typed errors: transient ones are retried, permanent ones are final.

Branch on the `error` string, never on the HTTP status: the platform's statuses disagree with its
own docs (see the brief, §6). Messages carry the code and Bitrix24's description only — never a
token, a URL with a token, or a request body. Each type carries the problem a user is shown
for it (`b24app.problems`).
"""

from __future__ import annotations

from b24app.problems import Problem


class BitrixError(Exception):
    transient = False
    problem = Problem.GAVE_UP

    def __init__(self, code: str, description: str = "", *, status: int | None = None) -> None:
        self.code = code
        self.description = description[:300]
        self.status = status
        super().__init__(f"{code}: {self.description}" if self.description else code)


# --- transient: try again later ---------------------------------------------------------------
class TransientError(BitrixError):
    transient = True
    problem = Problem.UNAVAILABLE


class RateLimited(TransientError):
    """QUERY_LIMIT_EXCEEDED from the portal, or our shared bucket has no room yet."""

    problem = Problem.RATE_LIMITED

    def __init__(
        self,
        code: str = "QUERY_LIMIT_EXCEEDED",
        description: str = "",
        *,
        status: int | None = None,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(code, description, status=status)
        self.retry_after = retry_after


class OperationTimeLimit(TransientError):
    """429 OPERATION_TIME_LIMIT: this method is paused for this app until `reset_at`."""

    problem = Problem.RATE_LIMITED

    def __init__(
        self,
        code: str = "OPERATION_TIME_LIMIT",
        description: str = "",
        *,
        status: int | None = None,
        reset_at: float = 0.0,
    ) -> None:
        super().__init__(code, description, status=status)
        self.reset_at = reset_at


class Unavailable(TransientError):
    """5xx, overload, a refused or timed-out connection: nothing was applied (or we cannot know)."""


class ResponseLost(Unavailable):
    """The request went out but no answer came back: the call may or may not have been applied.

    For a toggle such as `tasks.flow.Flow.pin` this matters: never assume either outcome.
    """


class MalformedAnswer(ResponseLost):
    """An answer that came back but cannot be read (a state that is no boolean, a total that is
    no number): whatever the request did is unknown, as with a lost answer."""


# --- tokens -----------------------------------------------------------------------------------
class TokenExpired(BitrixError):
    """expired_token: refresh (under the lock) and retry once."""

    problem = Problem.REOPEN


class InvalidToken(BitrixError):
    """invalid_token / NO_AUTH_FOUND: at most one locked refresh, then stop."""

    problem = Problem.REOPEN


# --- permanent: do not retry ------------------------------------------------------------------
class PermanentError(BitrixError):
    pass


class AuthRevoked(PermanentError):
    """The user's refresh chain is dead (invalid_grant, user_access_error): reopen the app."""

    problem = Problem.REOPEN


class PortalGone(PermanentError):
    """PAYMENT_REQUIRED, PORTAL_DELETED, app not installed: the admin must act (reinstall, pay)."""

    problem = Problem.REINSTALL


class InvalidClient(PermanentError):
    """Our client_id/client_secret are wrong for this portal — an operator problem."""

    problem = Problem.INTERNAL


class AccessDenied(PermanentError):
    """The token's user may not do this (including flows: "Access denied or flow not found")."""

    problem = Problem.DENIED


class MethodNotFound(PermanentError):
    """ERROR_METHOD_NOT_FOUND: e.g. tasks.flow.Flow.list on an older portal."""


class BadRequest(PermanentError):
    pass


# --- what the app concludes from them -----------------------------------------------------------
class ReopenRequired(PermanentError):
    """The user's tokens are gone or dead: they must open the app in Bitrix24 again."""

    problem = Problem.REOPEN

    def __init__(self, reason: str) -> None:
        super().__init__("REOPEN_REQUIRED", reason)


class ReinstallRequired(PermanentError):
    """The portal is uninstalled, unpaid or deleted: an admin must act in Bitrix24."""

    problem = Problem.REINSTALL

    def __init__(self, reason: str) -> None:
        super().__init__("REINSTALL_REQUIRED", reason)


_TRANSIENT: dict[str, type[BitrixError]] = {
    "QUERY_LIMIT_EXCEEDED": RateLimited,
    "OPERATION_TIME_LIMIT": OperationTimeLimit,
    "INTERNAL_SERVER_ERROR": Unavailable,
    "ERROR_UNEXPECTED_ANSWER": Unavailable,
    "OVERLOAD_LIMIT": Unavailable,
    "CONNECTION_ERROR": Unavailable,
    "temporarily_unavailable": Unavailable,
}
_TOKENS: dict[str, type[BitrixError]] = {
    "expired_token": TokenExpired,
    "invalid_token": InvalidToken,
    "NO_AUTH_FOUND": InvalidToken,
}
_PERMANENT: dict[str, type[BitrixError]] = {
    "invalid_grant": AuthRevoked,
    "bad_verification_code": AuthRevoked,
    "user_access_error": AuthRevoked,
    "authorization_error": AuthRevoked,
    "PAYMENT_REQUIRED": PortalGone,
    "PORTAL_DELETED": PortalGone,
    "APPLICATION_NOT_FOUND": PortalGone,
    "ERROR_OAUTH": PortalGone,
    "NOT_INSTALLED": PortalGone,
    "invalid_client": InvalidClient,
    "wrong_client": InvalidClient,
    "ACCESS_DENIED": AccessDenied,
    "INVALID_CREDENTIALS": AccessDenied,
    "insufficient_scope": AccessDenied,
    "INVALID_SCOPE": AccessDenied,
    "invalid_scope": AccessDenied,
    "WRONG_AUTH_TYPE": AccessDenied,
    "METHOD_CONFIRM_DENIED": AccessDenied,
    "ERROR_METHOD_NOT_FOUND": MethodNotFound,
}


_ACCESS_WORDS = ("access denied", "not found", "доступ", "не найден")


def error_from_body(
    code: str, description: str, status: int | None, *, reset_at: float | None = None
) -> BitrixError:
    """Map one `{"error": ..., "error_description": ...}` to its typed error."""
    if code == "OPERATION_TIME_LIMIT":
        return OperationTimeLimit(code, description, status=status, reset_at=reset_at or 0.0)
    if code == "QUERY_LIMIT_EXCEEDED":
        return RateLimited(code, description, status=status)
    for table in (_TRANSIENT, _TOKENS, _PERMANENT):
        if code in table:
            return table[code](code, description, status=status)
    if code == "0" and any(word in description.lower() for word in _ACCESS_WORDS):
        # Flow methods answer {"error":"0"} with localized text; access or not found is final.
        return AccessDenied(code, description, status=status)
    if status is not None and status >= 500:
        return Unavailable(code, description, status=status)
    return BadRequest(code, description, status=status)
