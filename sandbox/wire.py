"""What goes over the wire: the parsed request, the reply, and the REST error exception."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .params import parse_body, parse_php_query

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"


@dataclass
class Request:
    """An incoming HTTP request, already read from the socket.

    ``headers`` has lower-case names. ``local_host`` is the address the connection arrived on
    (the socket's local address, which a client cannot fake, unlike ``Host``); it picks the
    portal when every portal has its own loopback host.
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes = b""
    local_host: str = ""

    def params(self) -> dict[str, Any]:
        """Query string merged with the body (body wins, like PHP's ``$_REQUEST``).

        Raises :class:`~sandbox.params.ParamError` for an undecodable body.
        """
        merged = parse_php_query(self.query)
        merged.update(parse_body(self.body, self.headers.get("content-type", "")))
        return merged

    def bearer(self) -> str | None:
        header = self.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None

    def auth_token(self, params: Mapping[str, Any]) -> str | None:
        """``Authorization: Bearer`` first, then ``auth``, then ``access_token`` (core order)."""
        bearer = self.bearer()
        if bearer:
            return bearer
        for key in ("auth", "access_token"):
            value = params.get(key)
            if isinstance(value, str) and value:
                return value
        return None


@dataclass
class Reply:
    """What the HTTP layer should send back.

    ``drop=True`` means: send nothing and close the connection (a lost response).
    """

    status: int
    body: Any = None
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False

    @classmethod
    def json(cls, status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status=status, body=body, content_type=JSON_TYPE, headers=dict(headers or {}))

    @classmethod
    def html(cls, status: int, text: str, headers: dict[str, str] | None = None) -> Reply:
        return cls(status=status, body=text, content_type=HTML_TYPE, headers=dict(headers or {}))

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Reply:
        return cls(status=status, body="", content_type=HTML_TYPE, headers={"Location": location})

    @classmethod
    def error(cls, status: int, code: str, description: str) -> Reply:
        return cls.json(status, {"error": code, "error_description": description})

    @classmethod
    def dropped(cls) -> Reply:
        return cls(status=0, drop=True)

    def encode(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8")


class RestError(Exception):
    """A REST-level error: ``{"error": code, "error_description": description}``."""

    def __init__(
        self, status: int, code: str, description: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {description}")
        self.status = status
        self.code = code
        self.description = description
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description, **self.extra}

    def reply(self) -> Reply:
        return Reply.json(self.status, self.body())
