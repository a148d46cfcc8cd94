"""The portal REST client: call(), batch(), paginate().

Every request: a pooled session, connect and read timeouts, the method name in its exact case,
the token in the POST body (never in a URL), the shared per-portal bucket and per-method pause,
Bitrix24's error body read even on HTTP 200, and one metadata record (never a secret).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter

from b24app.bitrix.answers import as_dict, int_or_none, ints, json_body, reset_at
from b24app.bitrix.errors import (
    BadRequest,
    BitrixError,
    OperationTimeLimit,
    RateLimited,
    ResponseLost,
    Unavailable,
    error_from_body,
)
from b24app.bitrix.query import php_query
from b24app.bitrix.ratelimit import MethodPause, PortalRateLimiter

log = logging.getLogger(__name__)

BATCH_LIMIT = 50
PAGE_SIZE = 50

_local = threading.local()


def http_session() -> requests.Session:
    """One pooled session per process and thread (a forked Celery child builds its own), made
    again when the CA bundle named in the environment changes."""
    session: requests.Session | None = getattr(_local, "session", None)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    made_for = (os.getpid(), bundle)
    if session is None or getattr(_local, "made_for", None) != made_for:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=20, pool_maxsize=20, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "flow-pins/0.1"
        # requests reads the environment again on every request (proxies, no_proxy, a CA bundle,
        # a netrc file): a noticeable part of a worker's CPU per REST call. When it names no
        # proxy and no netrc file, the CA bundle is all it could change: read here (and looked
        # at again above, cheaply, for each request).
        session.trust_env = _proxy_or_netrc()
        if not session.trust_env:
            session.verify = bundle or True
        _local.session, _local.made_for = session, made_for
    return session


def _proxy_or_netrc() -> bool:
    """Whether a proxy (urllib's view of the environment, or of the system) or a netrc file
    could change a request: then requests keeps reading them for each one."""
    if getproxies():
        return True
    netrc = os.environ.get("NETRC")
    locations = (netrc,) if netrc is not None else ("~/.netrc", "~/_netrc")
    return any(os.path.exists(os.path.expanduser(path)) for path in locations)


@dataclass(frozen=True)
class CallRecord:
    member_id: str
    method: str
    http_status: int | None
    error: str
    duration_ms: int
    commands: int = 1


@dataclass
class CallResult:
    result: Any
    total: int | None = None
    next: int | None = None
    time: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchResult:
    results: dict[str, Any]
    errors: dict[str, BitrixError]
    totals: dict[str, int]
    nexts: dict[str, int]


class PortalClient:
    """Calls one portal's REST API. Token handling (refresh under a lock) lives a layer above."""

    def __init__(
        self,
        *,
        member_id: str,
        endpoint: str,
        rate: float | None = None,
        burst: int | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        on_moved: Callable[[str, str], str] | None = None,
        max_wait: float = 2.0,
        reserve: int = 0,
        timeout: tuple[float, float] | None = None,
    ) -> None:
        self.member_id = member_id
        self.endpoint = endpoint if endpoint.endswith("/") else endpoint + "/"
        self.limiter = PortalRateLimiter(member_id, rate, burst)
        self.on_call = on_call
        self.on_moved = on_moved
        self.max_wait = max_wait
        self.reserve = reserve  # burst slots left to interactive calls (see the limiter)
        self.timeout = timeout or settings.B24_HTTP_TIMEOUT

    # -- public ------------------------------------------------------------------------------
    def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, token: str
    ) -> CallResult:
        status, body = self._post(method, dict(params or {}), token=token, pause_key=method)
        if "error" in body:
            raise self._error(body, method, status)
        return CallResult(
            result=body.get("result"),
            total=int_or_none(body.get("total")),
            next=int_or_none(body.get("next")),
            time=body.get("time") or {},
        )

    def batch(
        self,
        commands: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        token: str,
        halt: bool = False,
    ) -> BatchResult:
        """Run up to 50 commands as one request; read every answer by its key, never by order."""
        if not commands:
            return BatchResult({}, {}, {}, {})
        if len(commands) > BATCH_LIMIT:
            raise ValueError(f"a batch holds at most {BATCH_LIMIT} commands")
        for method in {method for method, _ in commands.values()}:
            MethodPause(self.member_id, method).check()
        cmd = {key: f"{method}?{php_query(params)}" for key, (method, params) in commands.items()}
        status, body = self._post(
            "batch",
            {"halt": 1 if halt else 0, "cmd": cmd},
            token=token,
            pause_key=None,
            commands=len(cmd),
        )
        if "error" in body:
            raise self._error(body, "batch", status)
        outer = body.get("result") or {}
        results = as_dict(outer.get("result"))
        raw_errors = as_dict(outer.get("result_error"))
        errors: dict[str, BitrixError] = {}
        for key, err in raw_errors.items():
            if isinstance(err, Mapping):
                errors[key] = error_from_body(
                    str(err.get("error", "")), str(err.get("error_description", "")), None
                )
            else:
                errors[key] = BadRequest("ERROR", str(err))
        times = as_dict(outer.get("result_time"))
        for key, err in errors.items():
            if isinstance(err, OperationTimeLimit):
                method = commands[key][0] if key in commands else ""
                MethodPause(self.member_id, method).pause_until(
                    _batch_reset_at(key, method, commands, times)
                )
        return BatchResult(
            results=results,
            errors=errors,
            totals=ints(outer.get("result_total")),
            nexts=ints(outer.get("result_next")),
        )

    def paginate(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        token: str,
        items_key: str | None = None,
        max_pages: int = 200,
    ) -> Iterator[Any]:
        """Yield every item of a paged list: `next` when the portal gives it, else until a page
        holds fewer than 50 items (tasks.flow.Flow.list gives no `total`/`next`)."""
        start = 0
        for _ in range(max_pages):
            res = self.call(method, {**(params or {}), "start": start}, token=token)
            page = res.result
            if items_key is not None and isinstance(page, Mapping):
                page = page.get(items_key, [])
            items = list(page.values()) if isinstance(page, Mapping) else list(page or [])
            yield from items
            if res.next is not None:
                start = res.next
            elif len(items) >= PAGE_SIZE and res.total is None:
                start += PAGE_SIZE
            else:
                return

    # -- internals ---------------------------------------------------------------------------
    def _post(
        self,
        method: str,
        params: dict[str, Any],
        *,
        token: str,
        pause_key: str | None,
        commands: int = 1,
    ) -> tuple[int, dict[str, Any]]:
        if pause_key:
            MethodPause(self.member_id, pause_key).check()
        self.limiter.acquire(self.max_wait, reserve=self.reserve)
        payload = {**params, "auth": token}
        answer = self._send(method, payload, token=token, commands=commands, follow=True)
        if answer is None:  # the portal moved, and its new address is confirmed: send again there
            answer = self._send(method, payload, token=token, commands=commands, follow=False)
        assert answer is not None  # a redirect is followed once, then it is an answer
        return answer

    def _send(
        self, method: str, payload: dict[str, Any], *, token: str, commands: int, follow: bool
    ) -> tuple[int, dict[str, Any]] | None:
        """One POST, recorded in the call log. None: the portal redirected (`follow`), and
        `endpoint` is now its confirmed new address."""
        url = self.endpoint + method
        started = time.monotonic()
        status: int | None = None
        error = ""
        try:
            response = http_session().post(
                url,
                data=json.dumps(payload),
                allow_redirects=False,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self.timeout,
                stream=True,  # read under the size cap, not whole into memory
            )
            status = response.status_code
            if status in (301, 302, 303, 307, 308) and follow:
                response.close()
                error = "MOVED"
                self._record(method, status, error, started, commands)
                self.endpoint = self._follow(response.headers.get("Location", ""), token)
                return None
            body = json_body(response)
            if body is None:
                error = f"HTTP_{status}"
                raise (Unavailable if status >= 500 else BadRequest)(
                    error, "the portal answered without a JSON body", status=status
                )
            if "error" in body:
                error = str(body.get("error"))
            return status, body
        except ResponseLost as exc:  # an answer over the size cap
            error = exc.code
            raise
        except requests.exceptions.ConnectTimeout as exc:
            error = "CONNECT_TIMEOUT"
            raise Unavailable(error, "could not connect to the portal") from exc
        except requests.exceptions.ReadTimeout as exc:
            error = "READ_TIMEOUT"
            raise ResponseLost(error, "the portal did not answer in time") from exc
        except requests.exceptions.ConnectionError as exc:
            if _sent_but_lost(exc):
                error = "RESPONSE_LOST"
                raise ResponseLost(error, "the connection closed before an answer") from exc
            error = "CONNECTION_ERROR"
            raise Unavailable(error, "could not reach the portal") from exc
        finally:
            if error != "MOVED":
                self._record(method, status, error, started, commands)

    def _error(self, body: Mapping[str, Any], method: str, status: int | None) -> BitrixError:
        code = str(body.get("error", ""))
        description = str(body.get("error_description", ""))
        reset = reset_at(body.get("time")) if code == "OPERATION_TIME_LIMIT" else None
        err = error_from_body(code, description, status, reset_at=reset)
        if isinstance(err, RateLimited):
            self.limiter.saturate()
        if isinstance(err, OperationTimeLimit):
            MethodPause(self.member_id, method).pause_until(err.reset_at)
        return err

    def _follow(self, location: str, token: str) -> str:
        """A renamed portal answers 302 to its new address. The token goes there only after
        `on_moved` has had the new address confirmed (Bitrix24's OAuth server, for this portal);
        then the same POST is sent again."""
        parts = urlsplit(location)
        if not parts.netloc or "/rest/" not in parts.path:
            raise BadRequest("BAD_REDIRECT", "the portal redirected to an unusable address")
        path = parts.path[: parts.path.index("/rest/") + len("/rest/")]
        if self.on_moved is None:
            raise BadRequest("BAD_REDIRECT", "the portal redirected and cannot be re-verified")
        return self.on_moved(f"{parts.scheme}://{parts.netloc}{path}", token)

    def _record(
        self, method: str, status: int | None, error: str, started: float, commands: int
    ) -> None:
        if self.on_call is None:
            return
        try:
            self.on_call(
                CallRecord(
                    self.member_id,
                    method,
                    status,
                    error[:100],
                    int((time.monotonic() - started) * 1000),
                    commands,
                )
            )
        except Exception:  # the call log must never break a call
            log.warning("could not record REST call metadata", exc_info=True)


def _batch_reset_at(
    key: str,
    method: str,
    commands: Mapping[str, tuple[str, Mapping[str, Any]]],
    times: Mapping[str, Any],
) -> float:
    """When a method refused inside a batch (OPERATION_TIME_LIMIT) may be called again.

    A refused command's entry carries no `time` block of its own; the commands of the same
    method that ran before it do, and their `operating_reset_at` is when the oldest counted
    minute leaves the window — the docs' "first retry at the last operating_reset_at". With
    neither, a minute (one bucket of the window)."""
    if isinstance(times.get(key), Mapping):
        return reset_at(times[key])
    same = [
        times[other]
        for other, (name, _) in commands.items()
        if name == method and isinstance(times.get(other), Mapping)
    ]
    return max((reset_at(block) for block in same), default=reset_at(None))


def _sent_but_lost(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the request went out and the connection died before the answer."""
    text = repr(exc)
    return any(
        s in text
        for s in (
            "RemoteDisconnected",
            "Connection aborted",
            "ProtocolError",
            "ConnectionResetError",
            "IncompleteRead",
        )
    )
