"""The app's own record and grant: ``app.info`` and ``scope``."""

from __future__ import annotations

from typing import Any

from ..model import APP_CODE, APP_STATUS, LOCAL_APP_ID
from .common import CallContext


def app_info(ctx: CallContext, params: dict[str, Any]) -> Any:
    return {
        "ID": LOCAL_APP_ID,
        "CODE": APP_CODE,
        "VERSION": ctx.portal.app_version,
        "STATUS": APP_STATUS,
        "INSTALLED": ctx.portal.installed,
        "PAYMENT_EXPIRED": "Y" if ctx.knobs.payment_expired else "N",
        "DAYS": None,
        "LANGUAGE_ID": ctx.portal.language,
        "LICENSE": f"{ctx.portal.language}_project",
        "LICENSE_TYPE": "project",
        "LICENSE_FAMILY": "project",
    }


def scope_list(ctx: CallContext, params: dict[str, Any]) -> Any:
    return [s for s in ctx.token.scope.split(",") if s]
