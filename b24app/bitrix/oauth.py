"""Exchanges with the Bitrix24 OAuth server: the trusted `app.info`, and token refresh.

No ORM here: callers decide what to trust and what to save. Only allow-listed servers are ever
contacted (`B24_OAUTH_SERVERS`, https unless `B24_ALLOW_HTTP`), so a forged install cannot make us
send our client secret or a refresh token anywhere else. Tokens go in POST bodies, never in URLs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import requests
from django.conf import settings
from oauthlib.oauth2 import OAuth2Error
from requests_oauthlib import OAuth2Session

from b24app.bitrix.answers import read_capped
from b24app.bitrix.client import http_session
from b24app.bitrix.errors import (
    BadRequest,
    BitrixError,
    ResponseLost,
    Unavailable,
    error_from_body,
)


class UntrustedServer(BitrixError):
    """An OAuth server (or portal endpoint) outside the allowlist, or plain http without leave."""


def _allowed_schemes() -> tuple[str, ...]:
    return ("https", "http") if settings.B24_ALLOW_HTTP else ("https",)


_RESOLVED: dict[str, tuple[float, bool]] = {}
_RESOLVE_TTL = 60.0

# NAT64's well-known prefix carries the IPv4 address in its last 32 bits (RFC 6052); the
# local-use prefix of RFC 8215 is not globally reachable at all (and its layout is the
# operator's), though Python 3.11 calls it global.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast, and so is any IPv4 address it embeds: a packet to `::127.0.0.1`,
    `2002:7f00:1::1` (6to4) or `64:ff9b::7f00:1` (NAT64) ends at 127.0.0.1, yet Python 3.11's
    `is_global` is True for all three. (IPv4-mapped `::ffff:a.b.c.d` and Teredo `2001::/32` are
    already judged right by `is_global` itself.)"""
    if not address.is_global or address.is_multicast:
        return False
    if not isinstance(address, ipaddress.IPv6Address):
        return True
    if address in _NAT64_LOCAL:
        return False
    embedded: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(_is_public_address(inner) for inner in embedded)


def _is_public_host(host: str) -> bool:
    """True when every address the host resolves to is a public (global unicast) one.

    Loopback, private, link-local, multicast, reserved and unspecified addresses are refused, so a
    forged endpoint cannot point our tokens (or our client secret) at the app's own network.
    """
    now = time.monotonic()
    cached = _RESOLVED.get(host)
    if cached is not None and cached[0] > now:
        return cached[1]
    ttl = _RESOLVE_TTL
    try:
        infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    except (OSError, ValueError, UnicodeError):
        addresses = set()
        ttl = 5.0  # a resolver hiccup: refuse now, ask again soon
    public = bool(addresses) and all(_is_public_address(a) for a in addresses)
    if len(_RESOLVED) > 10_000:
        _RESOLVED.clear()
    _RESOLVED[host] = (now + ttl, public)
    return public


def _check_url(url: str, what: str, code: str) -> SplitResult:
    """https (http only with B24_ALLOW_HTTP), a host, no credentials, and — unless
    B24_ALLOW_HTTP is on for the sandbox — a host that resolves to public addresses only."""
    parts = urlsplit(url.strip())
    if parts.scheme not in _allowed_schemes():
        raise UntrustedServer(code, f"the {what} must use https")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise UntrustedServer(code, f"the {what} address is malformed")
    if not settings.B24_ALLOW_HTTP and not _is_public_host(parts.hostname):
        raise UntrustedServer(code, f"the {what} is not on a public internet host")
    return parts


def trusted_server_base(server_endpoint: str) -> str:
    """The allow-listed OAuth server base for `server_endpoint` (e.g. .../rest/), or refuse."""
    parts = urlsplit(server_endpoint.strip())
    if parts.scheme not in _allowed_schemes():
        raise UntrustedServer("UNTRUSTED_SERVER", "the OAuth server must use https")
    for base in settings.B24_OAUTH_SERVERS:
        allowed = urlsplit(base)
        if (parts.scheme, parts.netloc.lower()) == (
            allowed.scheme,
            allowed.netloc.lower(),
        ) and parts.path.startswith(allowed.path or "/"):
            _check_url(server_endpoint, "OAuth server", "UNTRUSTED_SERVER")
            return f"{allowed.scheme}://{allowed.netloc}{allowed.path or '/'}".rstrip("/") + "/"
    raise UntrustedServer("UNTRUSTED_SERVER", "the OAuth server is not in B24_OAUTH_SERVERS")


def check_portal_endpoint(client_endpoint: str) -> str:
    """A portal REST base from a trusted answer (app.info, a re-verified redirect): https on a
    public host (http and loopback only with B24_ALLOW_HTTP), normalised to end in a slash."""
    _check_url(client_endpoint, "portal endpoint", "UNTRUSTED_ENDPOINT")
    return normalize_endpoint(client_endpoint)


def normalize_endpoint(url: str) -> str:
    """The form endpoints are stored in (lower-case host, trailing slash): compare in it."""
    parts = urlsplit(url.strip())
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{parts.scheme}://{parts.netloc.lower()}{path}"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class AppInfo:
    """What the OAuth server vouches for about an access token."""

    client_id: str
    member_id: str
    domain: str
    client_endpoint: str
    user_id: int | None
    status: str
    scope: str
    installed: bool


def app_info(
    server_endpoint: str, access_token: str, *, timeout: tuple[float, float] | None = None
) -> AppInfo:
    base = trusted_server_base(server_endpoint)
    try:
        response = http_session().post(
            base + "rest/app.info",
            data={"auth": access_token},
            headers={"Accept": "application/json"},
            timeout=timeout or settings.B24_HTTP_TIMEOUT,
            allow_redirects=False,
            stream=True,
        )
        raw = read_capped(response, 1024 * 1024)  # an app.info answer is a few hundred bytes
    except requests.exceptions.RequestException as exc:
        raise Unavailable("OAUTH_UNREACHABLE", "the OAuth server did not answer") from exc
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise (Unavailable if response.status_code >= 500 else BadRequest)(
            f"HTTP_{response.status_code}",
            "the OAuth server answered without JSON",
            status=response.status_code,
        )
    if "error" in body:
        raise error_from_body(
            str(body["error"]), str(body.get("error_description", "")), response.status_code
        )
    result = body.get("result") or {}
    install = result.get("install") or {}
    if not isinstance(result, dict) or not isinstance(install, dict):
        raise BadRequest("BAD_APP_INFO", "app.info answered in an unexpected shape")
    user_id = result.get("user_id")
    return AppInfo(
        client_id=str(result.get("client_id") or ""),
        member_id=str(install.get("member_id") or ""),
        domain=str(install.get("domain") or ""),
        client_endpoint=str(install.get("client_endpoint") or ""),
        user_id=_user_id(user_id),
        status=str(install.get("status") or result.get("status") or ""),
        scope=str(install.get("scope") or result.get("scope") or ""),
        installed=bool(install.get("installed", True)),
    )


_USER_ID = re.compile(r"[0-9]{1,10}")


def _user_id(value: Any) -> int | None:
    """A user id from an OAuth answer, or None. ASCII digits only: "²".isdigit() is True, and
    int("²") raises, which would turn an odd answer into a 500 instead of a refusal."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    return int(text) if _USER_ID.fullmatch(text) else None


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str
    expires_at: float
    member_id: str
    user_id: int | None
    client_endpoint: str
    server_endpoint: str
    domain: str  # the OAuth server's domain in token responses, not the portal's


def _raise_for_server_error(response: requests.Response) -> requests.Response:
    if response.status_code >= 500:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:
            raise Unavailable(
                f"HTTP_{response.status_code}",
                "the OAuth server failed",
                status=response.status_code,
            )
    return response


def refresh(server_endpoint: str, refresh_token: str) -> TokenSet:
    """One refresh-token exchange (requests-oauthlib), client credentials in the form body.

    Refresh tokens rotate and are single-use: the caller must hold the user's token lock and
    save both new tokens before anyone uses them.
    """
    base = trusted_server_base(server_endpoint)
    if urlsplit(base).scheme == "http":
        os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"  # only reachable with B24_ALLOW_HTTP
    session = OAuth2Session(client_id=settings.B24_CLIENT_ID)
    session.register_compliance_hook("refresh_token_response", _raise_for_server_error)
    try:
        token: dict[str, Any] = session.refresh_token(
            base + "oauth/token/",
            refresh_token=refresh_token,
            client_id=settings.B24_CLIENT_ID,
            client_secret=settings.B24_CLIENT_SECRET,
            timeout=settings.B24_HTTP_TIMEOUT,
        )
    except OAuth2Error as exc:
        raise error_from_body(str(exc.error), str(exc.description or ""), exc.status_code) from None
    except requests.exceptions.ReadTimeout as exc:
        raise ResponseLost("OAUTH_TIMEOUT", "the OAuth server did not answer in time") from exc
    except requests.exceptions.RequestException as exc:
        raise Unavailable("OAUTH_UNREACHABLE", "the OAuth server did not answer") from exc
    except ValueError as exc:  # an unparseable body
        raise Unavailable("OAUTH_BAD_ANSWER", "the OAuth server answered nonsense") from exc
    finally:
        session.close()
    if not token.get("access_token") or not token.get("refresh_token"):
        raise BadRequest("OAUTH_BAD_ANSWER", "the token answer holds no token pair")
    expires = token.get("expires")
    expires_in = token.get("expires_in") or 3600
    expires_at = float(expires) if expires else time.time() + float(expires_in)
    user_id = token.get("user_id")
    return TokenSet(
        access_token=str(token["access_token"]),
        refresh_token=str(token["refresh_token"]),
        expires_at=expires_at,
        member_id=str(token.get("member_id") or ""),
        user_id=_user_id(user_id),
        client_endpoint=str(token.get("client_endpoint") or ""),
        server_endpoint=str(token.get("server_endpoint") or ""),
        domain=str(token.get("domain") or ""),
    )
