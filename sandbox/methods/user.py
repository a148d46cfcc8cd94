"""The user namespace: ``profile``, ``user.admin``, ``user.current`` (the token's user)."""

from __future__ import annotations

from typing import Any

from .common import CallContext


def profile(ctx: CallContext, params: dict[str, Any]) -> Any:
    u = ctx.user
    return {
        "ID": str(u.id),
        "ADMIN": u.admin,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "PERSONAL_GENDER": u.gender,
        "TIME_ZONE": "",
    }


def user_admin(ctx: CallContext, params: dict[str, Any]) -> Any:
    return ctx.user.admin


def user_current(ctx: CallContext, params: dict[str, Any]) -> Any:
    u = ctx.user
    return {
        "ID": str(u.id),
        "XML_ID": None,
        "ACTIVE": True,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "SECOND_NAME": "",
        "EMAIL": u.email or f"user{u.id}@{ctx.portal.domain}",
        "PERSONAL_GENDER": u.gender,
        "IS_ONLINE": "N",
        "TIME_ZONE": "",
        "UF_DEPARTMENT": list(u.departments),
        "USER_TYPE": "extranet" if u.extranet else "employee",
    }
